"""The tensors a config implies, from the config alone: names, shapes, parameter count, family rules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig

# GPT-2 and BERT have no head_dim field (hidden = heads x head_dim) and no grouped-query attention.
FIXED_HEAD_DIM = ("gpt2", "bert")
# The switches that make a family what it is: set on import, required on export ("any": free to vary).
_LLAMA_SWITCHES = dict(
    norm="rmsnorm",
    norm_position="pre",
    position="rope",
    mlp="swiglu",
    causal=True,
    pooler=False,
    type_vocab_size=0,
    embed_norm=False,
    final_norm=True,
    sliding_window=None,
    classifier_bias=False,
)
_GELU_SWITCHES = dict(
    norm="layernorm",
    position="learned",
    mlp="gelu",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    head_dim=None,
    sliding_window=None,
)
FAMILY_SWITCHES = {
    "llama": _LLAMA_SWITCHES,
    "mistral": {**_LLAMA_SWITCHES, "sliding_window": "any", "qkv_bias": False, "out_bias": False, "mlp_bias": False},
    "qwen2": {**_LLAMA_SWITCHES, "sliding_window": "any", "qkv_bias": True, "out_bias": False, "mlp_bias": False},
    "gpt2": {
        **_GELU_SWITCHES,
        "norm_position": "pre",
        "causal": True,
        "type_vocab_size": 0,
        "embed_norm": False,
        "final_norm": True,
        "pooler": False,
        "classifier_bias": False,
    },
    "bert": {**_GELU_SWITCHES, "norm_position": "post", "causal": False, "embed_norm": True, "final_norm": False},
}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """lmforge name -> shape of every tensor a checkpoint of `cfg` stores (a tied lm_head is the embedding).

    Derived from the config alone, in Transformer's state_dict order (tests/test_hf_streaming.py holds the two
    equal): building even a meta-device model costs a second and ~70 MB (nn.Embedding imports torch._dynamo)."""
    C, D, F = cfg.hidden_size, cfg.dim_head, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (C,)
        if cfg.norm == "layernorm":
            shapes[f"{name}.bias"] = (C,)

    shapes["embed.tok.weight"] = (cfg.vocab_size, C)
    if cfg.position == "learned":
        shapes["embed.pos.weight"] = (cfg.max_seq_len, C)
    if cfg.type_vocab_size:
        shapes["embed.token_type.weight"] = (cfg.type_vocab_size, C)
    if cfg.embed_norm:
        norm("embed.norm")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        norm(f"{p}attn_norm")
        linear(f"{p}attn.q_proj", cfg.num_heads * D, C, cfg.qkv_bias)
        linear(f"{p}attn.k_proj", cfg.n_kv_heads * D, C, cfg.qkv_bias)
        linear(f"{p}attn.v_proj", cfg.n_kv_heads * D, C, cfg.qkv_bias)
        extra = cfg.heldout_heads * cfg.heldout_dim_head if i < cfg.heldout_layers else 0  # held-out heads join
        linear(f"{p}attn.o_proj", C, cfg.num_heads * D + extra, cfg.out_bias)
        norm(f"{p}mlp_norm")
        if cfg.mlp == "swiglu":
            linear(f"{p}mlp.gate_proj", F, C, cfg.mlp_bias)
        linear(f"{p}mlp.up_proj", F, C, cfg.mlp_bias)
        linear(f"{p}mlp.down_proj", C, F, cfg.mlp_bias)
    if cfg.final_norm:
        norm("norm")
    if cfg.heldout_layers:  # model/heldout.py's HeldOut, in its state_dict order
        W, Dh, n = cfg.heldout_stream, cfg.heldout_dim_head, cfg.heldout_heads
        linear("heldout.embed_proj", W, C, False)
        for j in range(cfg.heldout_layers):
            p = f"heldout.layers.{j}."
            shapes[f"{p}norm.weight"] = (W,)
            for proj in ("q_proj", "k_proj", "v_proj"):
                linear(f"{p}{proj}", n * Dh, W, False)
            linear(f"{p}o_proj", W, n * Dh, False)
        shapes["heldout.norm.weight"] = (W,)
        linear("heldout.out_proj", C, W, False)
    if cfg.pooler:
        linear("pooler.dense", C, C, True)
    if cfg.head == "lm" and not cfg.tie_embeddings:
        linear("lm_head", cfg.vocab_size, C, False)
    elif cfg.head == "classifier":
        linear("classifier", cfg.num_labels, C, cfg.classifier_bias)
    return shapes


def param_count(cfg: ModelConfig) -> int:
    """Every parameter of a model of `cfg`, a tied embedding / LM head counted once: the one parameter counter."""
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def check_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor], source: str = "checkpoint"
) -> Iterator[tuple[str, Tensor]]:
    """Pass lmforge-named tensors through, raising UserError on an unexpected, duplicate, mis-shaped, non-float
    or (at the end) missing one. A tied lm_head is dropped: it is the embedding."""
    shapes = expected_shapes(cfg)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    seen = set()
    for name, t in items:
        if name == "lm_head.weight" and name not in shapes and cfg.tie_embeddings:
            continue
        if name not in shapes:
            raise UserError(f"{source}: unexpected tensor {name} (not part of this {cfg.family} config)")
        if name in seen:
            raise UserError(f"{source}: tensor {name} appears twice")
        if tuple(t.shape) != shapes[name]:
            raise UserError(
                f"{source}: tensor {name} has shape {list(t.shape)} but the config needs {list(shapes[name])}"
            )
        if not t.is_floating_point():
            raise UserError(f"{source}: tensor {name} has dtype {t.dtype}; lmforge needs float tensors")
        seen.add(name)
        yield name, t
        del t  # a suspended generator's locals stay alive: let this one go before the next is made
    missing = [n for n in shapes if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: missing tensor {missing[0]}{more}")

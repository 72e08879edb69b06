"""ModelConfig: every architecture lmforge runs is one point in this space.

A Llama, a Qwen2, a GPT-2 and a BERT differ only in a handful of switches (norm kind and
position, position encoding, MLP kind, biases, causal or not), so one config and one model
class cover them all. The config is frozen: surgery returns a new one with `replace(...)`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert")
HEADS = ("lm", "classifier", "none")


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"  # HF model_type to export as: llama | mistral | qwen2 | gpt2 | bert
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    ffn_size: int = 688
    max_seq_len: int = 2048

    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre (GPT-2, Llama) | post (BERT)
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF's dict; only rope_type "llama3" and "default"
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    mlp: str = "swiglu"  # swiglu | gelu
    activation: str = "silu"  # silu | gelu (erf) | gelu_tanh
    qkv_bias: bool = False  # Qwen2, GPT-2, BERT
    out_bias: bool = False  # attention output and MLP biases: GPT-2, BERT
    mlp_bias: bool = False
    tie_embeddings: bool = False
    causal: bool = True
    type_vocab_size: int = 0  # BERT token types; 0: none
    embed_norm: bool = False  # BERT: LayerNorm right after the embeddings
    final_norm: bool = True  # pre-norm models end with a norm; post-norm ones do not

    head: str = "lm"  # lm | classifier | none (hidden states out)
    num_labels: int = 0  # classifier head only
    pooler: bool = False  # BERT: dense + tanh on the first token before the classifier
    classifier_bias: bool = False  # BERT's classifier has a bias; decoders' `score` has none
    pad_token_id: int | None = None  # decoder classifiers score the last non-pad token
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # PSP++ held-out heads (model/heldout.py): attention heads of their own in the lower `heldout_layers` layers,
    # with their own residual stream and LM loss; their outputs join the main heads' before each layer's o_proj.
    heldout_layers: int = 0  # 0: none
    heldout_heads: int = 0  # held-out heads per layer
    heldout_head_dim: int | None = None  # None: the main head size
    heldout_width: int | None = None  # the held-out stream's width; None: heldout_heads x heldout_head_dim
    heldout_detach: bool = True  # the main model reads the held-out states detached (False: an ablation)
    # HF fields lmforge does not use but must write back for a faithful export.
    hf_extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"invalid model config: {msg}")

        need(self.family in FAMILIES, f"family {self.family!r} is not one of {FAMILIES}")
        need(self.head in HEADS, f"head {self.head!r} is not one of {HEADS}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm {self.norm!r}")
        need(self.norm_position in ("pre", "post"), f"norm_position {self.norm_position!r}")
        need(self.position in ("rope", "learned"), f"position {self.position!r}")
        need(self.mlp in ("swiglu", "gelu"), f"mlp {self.mlp!r}")
        need(self.activation in ("silu", "gelu", "gelu_tanh"), f"activation {self.activation!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(
            self.n_kv_heads > 0 and self.num_heads % self.n_kv_heads == 0,
            f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.n_kv_heads}",
        )
        if self.head_dim is None:
            need(
                self.hidden_size % self.num_heads == 0,
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
            )
        need(self.position != "rope" or self.dim_head % 2 == 0, f"head_dim {self.dim_head} must be even for RoPE")
        need(self.head != "classifier" or self.num_labels > 0, "a classifier head needs num_labels > 0")
        if self.heldout_layers:
            need(0 < self.heldout_layers <= self.num_layers, f"heldout_layers must be in 1..{self.num_layers}")
            need(self.heldout_heads > 0, "heldout_heads must be positive with heldout_layers")
            need(self.heldout_dim_head % 2 == 0, f"heldout_head_dim {self.heldout_dim_head} must be even for RoPE")
            need(
                self.position == "rope" and self.norm_position == "pre" and self.head == "lm" and self.causal,
                "held-out heads need a pre-norm causal LM with RoPE",
            )

    @property
    def heldout_dim_head(self) -> int:
        return self.heldout_head_dim or self.dim_head

    @property
    def heldout_stream(self) -> int:
        return self.heldout_width or self.heldout_heads * self.heldout_dim_head

    @property
    def n_kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"invalid model config: unknown keys {unknown}")
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read model config {path}: {e}") from None
        if not isinstance(d, dict):
            raise UserError(f"model config {path} is not a JSON object")
        return cls.from_dict(d)


# Small presets for the embedded default, tests and benchmarks; real models come from checkpoints.
PRESETS: dict[str, ModelConfig] = {
    # The shape of the throughput benchmark (bench/throughput.py): ~5M parameters.
    "llama-5m": ModelConfig(
        vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, ffn_size=688, max_seq_len=1024
    ),
    # GPT-2 small's shape with a Llama block: the GPU benchmark model (~124M).
    "llama-124m": ModelConfig(
        vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, ffn_size=2048, max_seq_len=1024
    ),
}

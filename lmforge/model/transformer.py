"""One readable Transformer for every family lmforge supports.

Llama / Mistral / Qwen2 / SmolLM, GPT-2 and BERT are the same stack of blocks with different
switches (see ModelConfig). Parameter names are lmforge's own and identical across families,
so surgery (grow, fuse, tie) is written once:

    embed.tok.weight  embed.pos.weight  embed.token_type.weight  embed.norm.{weight,bias}
    layers.{i}.attn_norm.*  layers.{i}.attn.{q,k,v,o}_proj.*
    layers.{i}.mlp_norm.*   layers.{i}.mlp.{gate,up,down}_proj.*
    norm.*  lm_head.weight  pooler.dense.*  classifier.*

In a pre-norm block (Llama, GPT-2) attn_norm / mlp_norm are applied to the sub-layer input;
in a post-norm block (BERT) to the residual sum after it. Nothing here knows about
parallelism, compilation or mixed precision: train.py and dist.py apply those from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig
from lmforge.model.heldout import HeldOut
from lmforge.model.shapes import param_count


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32 as HF does, then back to the input dtype before the gain.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Per-pair rotation frequencies (head_dim/2,), with Llama 3's frequency-dependent scaling."""
    d = cfg.dim_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq


def sequence_logits(x: Tensor, input_ids: Tensor, pad_token_id: int | None, pooler, classifier: nn.Linear) -> Tensor:
    """A sequence classifier's logits (B, num_labels) from the last hidden states x (B, T, C): BERT's first ([CLS])
    token through its pooler (dense + tanh); a decoder's last non-pad token (HF's rule; without a pad id, the last
    position)."""
    if pooler is not None:
        return classifier(torch.tanh(pooler["dense"](x[:, 0])))
    B, T = input_ids.shape
    if pad_token_id is not None:
        idx = (torch.arange(T, device=x.device) * (input_ids != pad_token_id)).argmax(-1)
    else:
        idx = torch.full((B,), T - 1, device=x.device)
    return classifier(x[torch.arange(B, device=x.device), idx])


def segment_positions(segment_ids: Tensor) -> Tensor:
    """(B, T) positions counted from the start of each token's segment, for segment ids non-decreasing along a row."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values  # each segment's start
    return idx - first


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (T, D), of these positions for frequencies inv_freq (D/2,), computed in float32."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, D); cos, sin: (T, D). HF's half-split layout: pairs are (i, i + D/2).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; `pos` tokens are filled."""

    k: list[Tensor]  # per layer (B, n_kv, max_len, D)
    v: list[Tensor]
    pos: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        """One entry per layer position, then one per held-out layer (model/heldout.py)."""
        shapes = [(batch, cfg.n_kv_heads, max_len, cfg.dim_head)] * cfg.num_layers
        shapes += [(batch, cfg.heldout_heads, max_len, cfg.heldout_dim_head)] * cfg.heldout_layers
        return cls(
            [torch.zeros(s, device=device, dtype=dtype) for s in shapes],
            [torch.zeros(s, device=device, dtype=dtype) for s in shapes],
        )

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys and values (B, H, T, D) of cache entry `layer` after the `pos` filled ones; return
        all of them so far. The model advances `pos` once every layer has written."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, extra_in: int = 0):
        """extra_in: the width of held-out head outputs concatenated with this layer's before o_proj (PSP++)."""
        super().__init__()
        self.n_heads, self.n_kv, self.d = cfg.num_heads, cfg.n_kv_heads, cfg.dim_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d + extra_in, cfg.hidden_size, bias=cfg.out_bias)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        extra: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_heads
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d)
        if extra is not None:  # held-out heads' outputs (B, T, n*Dh) join this layer's heads
            y = torch.cat([y, extra.to(y.dtype)], dim=-1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[
            cfg.activation
        ]

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, extra_in: int = 0):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, extra_in)
        self.mlp_norm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope, mask, is_causal, cache=None, layer=0, states=None, extra=None) -> Tensor:
        if self.pre_norm:
            a = self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer, extra)
            x = x + a
            x = x + self.mlp(self.mlp_norm(x))
        else:
            a = self.attn(x, rope, mask, is_causal, cache, layer)
            x = self.attn_norm(x + a)
            x = self.mlp_norm(x + self.mlp(x))
        if states is not None:
            states["attn"].append(a)
        return x


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg, cfg.hidden_size) if cfg.embed_norm else None

    def forward(self, input_ids: Tensor, positions: Tensor, token_type_ids: Tensor | None) -> Tensor:
        x = self.tok(input_ids)  # (B, T, C)
        if self.pos is not None:
            x = x + self.pos(positions)
        if self.token_type is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_type(types)
        return self.norm(x) if self.norm is not None else x


class Transformer(nn.Module):
    """`model(input_ids)` -> logits (B, T, V) for an LM head, (B, num_labels) for a classifier,
    last hidden states (B, T, C) for a headless encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        extra = cfg.heldout_heads * cfg.heldout_dim_head
        self.layers = nn.ModuleList(Block(cfg, extra if i < cfg.heldout_layers else 0) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size) if cfg.final_norm else None
        self.heldout = HeldOut(cfg) if cfg.heldout_layers else None
        if cfg.position == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.lm_head = self.classifier = None
        # BERT's pooler (dense + tanh on the first token) exists in headless checkpoints too.
        self.pooler = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.hidden_size)}) if cfg.pooler else None
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed.tok.weight
        elif cfg.head == "classifier":
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=cfg.classifier_bias)

    # ---- initialisation for training from scratch -------------------------------------------
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """GPT-2's scheme: N(0, std) everywhere, residual-writing projections scaled by 1/sqrt(2L)."""
        resid_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s, generator=generator)

    def separate_parameter_sets(self) -> list[list[nn.Parameter]]:
        """Parameters that learn from a loss of their own, apart from the rest: the held-out model (PSP++), whose
        gradients the loop clips by their own norm. With heldout_detach off (the ablation) both losses reach them."""
        return [list(self.heldout.parameters())] if self.heldout is not None else []

    def num_params(self) -> int:
        """Parameters, a tied embedding / LM head counted once (model/shapes.py's count, from the config)."""
        return param_count(self.config)

    # ---- forward --------------------------------------------------------------------------------
    def _mask(
        self, T: int, start: int, attention_mask: Tensor | None, device, segment_ids: Tensor | None = None
    ) -> tuple[Tensor | None, bool]:
        """Boolean (B|1, 1, T, S) mask (True = attend), or None with is_causal for SDPA's fast path."""
        cfg, S = self.config, start + T
        window = cfg.sliding_window if cfg.causal and cfg.sliding_window and cfg.sliding_window < S else None
        if attention_mask is None and segment_ids is None and window is None and (not cfg.causal or start == 0):
            return None, cfg.causal
        qpos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        kpos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (kpos <= qpos) if cfg.causal else torch.ones(T, S, dtype=torch.bool, device=device)
        if window is not None:
            mask = mask & (qpos - kpos < window)
        mask = mask[None, None]  # (1, 1, T, S)
        if attention_mask is not None:  # (B, S) with 1 = real token, 0 = padding
            mask = mask & attention_mask[:, None, None, :S].bool()
        if segment_ids is not None:  # (B, T): packed examples attend only inside their own segment
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        return mask, False

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """(cos, sin), each (T, D), for these positions; None without RoPE."""
        if self.config.position != "rope":
            return None
        return rope_cos_sin(self.inv_freq, positions, dtype)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        cache: KVCache | None = None,
        return_states: bool = False,
        segment_ids: Tensor | None = None,
    ):
        """input_ids (B, T). segment_ids (B, T), non-decreasing along each row, packs several sequences into one row:
        a token attends only to its own segment's, and learned positions restart at each segment, so every packed
        sequence computes what it computes alone (RoPE needs no restart: its scores depend on relative position
        only). With return_states, also returns {"hidden": [x_0 .. x_L], "attn": [a_1 .. a_L]}:
        x_0 the embeddings, x_i the output of layer i (before the final norm), a_i layer i's attention
        output before it joins the residual stream; with held-out heads also "heldout_logits" (B, T, V)."""
        cfg = self.config
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > cfg.max_seq_len and cfg.position == "learned":
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len {cfg.max_seq_len}")
        if segment_ids is not None and (cache is not None or not cfg.causal):
            raise ValueError("segment_ids (packed sequences) are for causal training forwards, without a cache")
        positions = torch.arange(start, start + T, device=input_ids.device)
        own = segment_positions(segment_ids) if segment_ids is not None else positions  # learned positions restart
        x = self.embed(input_ids, own, token_type_ids)  # (B, T, C)
        rope = self.rope(positions, x.dtype)
        mask, is_causal = self._mask(T, start, attention_mask, input_ids.device, segment_ids)
        states = {"hidden": [x], "attn": []} if return_states else None
        extras: list[Tensor] = []
        if self.heldout is not None:  # the held-out model first: its states feed the lower main layers
            extras, final = self.heldout(x.detach(), positions, mask, is_causal, cache, cfg.num_layers)
            if cfg.heldout_detach:
                extras = [e.detach() for e in extras]
            if states is not None:
                out_embedding = self.lm_head.weight if self.lm_head is not None else self.embed.tok.weight
                states["heldout_logits"] = self.heldout.logits(final, out_embedding)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, is_causal, cache, i, states, extras[i] if i < len(extras) else None)
            if states is not None:
                states["hidden"].append(x)
        if cache is not None:
            cache.pos += T
        if self.norm is not None:
            x = self.norm(x)
        out = self._head(x, input_ids, attention_mask)
        return (out, states) if return_states else out

    def _head(self, x: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        cfg = self.config
        if self.lm_head is not None:
            return self.lm_head(x)  # (B, T, V)
        if self.classifier is None:
            return x  # (B, T, C)
        return sequence_logits(x, input_ids, cfg.pad_token_id, self.pooler, self.classifier)

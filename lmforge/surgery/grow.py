"""Growth: a larger model initialised from a smaller trained one, so that it starts with the same outputs.

`grow(cfg, src, hidden=..., layers=...)` -> (target config, iterator of (name, tensor)). It is pure and
streaming: every target tensor is a function of ONE source tensor (plus the config and a per-name random
seed), so `src` may be a dict, a lazy mapping, or the iterator `lmforge.io.checkpoints.read_checkpoint` returns, and
the output is produced tensor by tensor in the source's order: memory stays near one tensor.

What is exact (max relative logit error at float rounding; `check` measures it):

| growth                      | pre-norm (Llama RMSNorm, GPT-2 LayerNorm) | post-norm (BERT)              |
|-----------------------------|-------------------------------------------|-------------------------------|
| hidden, clone, integer      | exact                                     | exact                         |
| hidden, clone, non-integer  | exact (k copies + padding, see below)     | approximate (measured)        |
| hidden, zero                | exact                                     | approximate (measured)        |
| ffn, heads, KV heads        | exact, any factor, both modes             | exact, any factor, both modes |
| layers interleave/top/bottom| exact (o_proj, down_proj zero)            | exact up to ~eps/var          |
| layers stack (G_stack)      | not function preserving                   | not function preserving       |
| noise cancel / plain        | exact up to rounding / approximate        | same                          |

Storage dtype. The table holds in float32 (and wider). Growth multiplies stored values by constants: norm gains by
sqrt(k d_s / d_t) (below), readers of k residual copies by 1/k, readers of c copied FFN neurons or query heads by
1/c, a tied head's norm by 1/k. A power of two only shifts the exponent, so it is exact in any float; any other
factor, a LayerNorm pad (a mean) and cancelling noise are rounded to the stored precision. In a bfloat16 / float16
checkpoint, depth growth and widening by 2x or 4x copies are therefore exact; a NON-integer widening (e.g. 576 ->
864: gains x sqrt(2/3)), zero-mode widening (gains x sqrt(d_s / d_t)), 3x copies and noise are exact only up to
that rounding (docs/growth.md gives the errors measured on SmolLM2-135M). Grow a float32 copy where that matters;
`exactness(..., dtype)` says which case a growth is in.

Residual stream. clone: x -> [x, x, ..., pad] with k = floor(d_t / d_s) copies; zero: [x, pad]. The pad
holds 0 with RMSNorm and the mean of x with LayerNorm ("average expansion": every residual writer's new rows
are the mean of its old rows), so the mean square (RMSNorm) or mean and variance (LayerNorm) of the target
vector are those of x times r = k d_s / d_t. Norm gains are multiplied by sqrt(r) and eps by r (in the
config), which makes the norm outputs on the copies exactly those of the source; on the pad they are 0
(bias 0). Readers of the residual divide by k. With integer clone r = 1: gains tiled, eps unchanged.
A post-norm LayerNorm's output IS the residual stream, so its pad would have to hold the mean of its outputs,
which depends on the input unless gamma is uniform: post-norm models are exact only for integer clone.

Heads: head_dim is fixed, heads are added (see grow_width.head_axes for the GQA order). Tied embeddings stay
tied: with k copies the head would read k * logits, so the norm before the head (the final norm, or the last
post-norm LayerNorm) has its gain and bias divided by k; only a pre-norm model without final norm is untied.
New heads / neurons in zero mode get random input weights and zero output columns; padded residual dims are
read through random columns where the norm output there is exactly 0 (pre-norm), zero columns otherwise.

Symmetry: after duplication the copies get identical gradients forever. `noise_snr_db` adds noise to every
weight that reads duplicated inputs (residual copies, neuron copies, head copies), by default "cancel" noise
that sums to zero over the copies (HyperCloning): weights differ, outputs do not.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import FIXED_HEAD_DIM, expected_shapes
from lmforge.model.transformer import Transformer
from lmforge.objectives.lm import lm_loss
from lmforge.surgery.grow_depth import DEPTHS, ZEROED, PostNormPlan, layout, post_norm_plan
from lmforge.surgery.grow_width import (
    Axis,
    Spec,
    ffn_axis,
    grow_norm,
    grow_tensor,
    head_axes,
    hidden_axis,
    rms,
    symmetry_noise,
)

MODES = ("clone", "zero")
NOISES = ("cancel", "plain")


# ---- the target config ---------------------------------------------------------------------------------------------
def target_config(
    cfg: ModelConfig,
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    mode: str = "clone",
) -> ModelConfig:
    """The grown config. Unset sizes follow the hidden factor: FFN scales with it; heads become hidden / head_dim
    when the source has hidden = heads * head_dim and that divides; KV heads keep the group size when they can."""
    if cfg.heldout_layers:
        raise UserError("this surgery does not know held-out heads (PSP++): their sizes are tied to the main model's")
    if mode not in MODES:
        raise UserError(f"growth mode {mode!r} is not one of {MODES}")
    d_s, hd, h_s, kv_s = cfg.hidden_size, cfg.dim_head, cfg.num_heads, cfg.n_kv_heads
    d_t = hidden if hidden is not None else d_s
    if heads is None:
        heads = d_t // hd if d_s == h_s * hd and d_t % hd == 0 else h_s
    if kv_heads is None:
        if (heads * kv_s) % h_s == 0:
            kv_heads = heads * kv_s // h_s
        elif heads % kv_s == 0:
            kv_heads = kv_s
        else:
            raise UserError(f"{heads} heads keep neither the group size nor the {kv_s} KV heads: give --kv-heads")
    ffn = ffn if ffn is not None else round(cfg.ffn_size * d_t / d_s)
    layers = layers if layers is not None else cfg.num_layers
    sizes = dict(
        hidden=(d_t, d_s),
        ffn=(ffn, cfg.ffn_size),
        heads=(heads, h_s),
        kv_heads=(kv_heads, kv_s),
        layers=(layers, cfg.num_layers),
    )
    for name, (new, old) in sizes.items():
        if not isinstance(new, int) or new < old:
            raise UserError(f"target {name} {new} is smaller than the source's {old}: growth only adds")
    if heads % kv_heads:
        raise UserError(f"target heads {heads} is not a multiple of target KV heads {kv_heads}")
    if cfg.family in FIXED_HEAD_DIM and (heads * hd != d_t or kv_heads != heads):
        raise UserError(
            f"{cfg.family} needs hidden = heads x head_dim ({hd}) and no KV grouping: hidden {d_t}, "
            f"heads {heads}, KV heads {kv_heads} do not fit (head_dim never changes)"
        )
    k = d_t // d_s if mode == "clone" else 1
    ratio = k * d_s / d_t  # mean-square ratio of [x]*k + pad to x (1 for integer clone)
    return cfg.replace(
        hidden_size=d_t,
        ffn_size=ffn,
        num_heads=heads,
        num_layers=layers,
        num_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=None if heads * hd == d_t else hd,
        norm_eps=cfg.norm_eps * ratio if ratio != 1 else cfg.norm_eps,
        tie_embeddings=cfg.tie_embeddings and not _must_untie(cfg, k),
    )


def _head_norm(cfg: ModelConfig) -> str | None:
    """The norm right before the LM head, whose gain can absorb the copy count of a tied head."""
    if cfg.final_norm:
        return "norm"
    return f"layers.{cfg.num_layers - 1}.mlp_norm" if cfg.norm_position == "post" else None


def _must_untie(cfg: ModelConfig, k: int) -> bool:
    return cfg.tie_embeddings and cfg.head == "lm" and k > 1 and _head_norm(cfg) is None


def exactness(
    cfg_s: ModelConfig,
    cfg_t: ModelConfig,
    mode: str,
    depth: str,
    noise: str | None,
    dtype: torch.dtype | str | None = None,
) -> str:
    """One line: what the growth preserves (see the module docstring's table and its "Storage dtype" note).

    dtype: the dtype the grown tensors are stored in (None: float32 or wider). In bfloat16 / float16 a growth that
    multiplies stored values by a factor other than a power of two is exact only up to their rounding: non-integer
    widening (norm gains x sqrt(k d_s / d_t)), zero-mode widening (gains x sqrt(d_s / d_t)), 3x copies, symmetry
    noise. Depth
    growth and widening by 2x / 4x copies are exact in any dtype."""
    notes = []
    if depth == "stack" and cfg_t.num_layers > cfg_s.num_layers:
        notes.append("not function preserving: G_stack copies the layers")
    post = cfg_s.norm_position == "post"
    widened = cfg_t.hidden_size != cfg_s.hidden_size
    if post and widened and not (mode == "clone" and cfg_t.hidden_size % cfg_s.hidden_size == 0):
        notes.append("approximate: post-norm LayerNorm with padded residual dims")
    if post and depth != "stack" and cfg_t.num_layers > cfg_s.num_layers:
        notes.append("identity blocks exact up to ~eps/variance (post-norm)")
    if noise == "plain":
        notes.append("approximate: plain (non-cancelling) noise")
    name = str(dtype).removeprefix("torch.")
    rounded = _rounded_in_16_bit(cfg_s, cfg_t, mode, noise) if name in ("bfloat16", "float16") else []
    if rounded:
        notes.append(f"exact only up to {name} rounding of {', '.join(rounded)} (exact in float32)")
    return "; ".join(notes) or "exact"


def _power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _rounded_in_16_bit(cfg_s: ModelConfig, cfg_t: ModelConfig, mode: str, noise: str | None) -> list[str]:
    """What growth computes that a 16-bit float cannot hold exactly: factors other than powers of two (which
    only shift the exponent), LayerNorm pads (means of the copied rows) and cancelling noise (it sums to zero
    only before rounding). float32 rounds them too, but at ~1e-7: `check` measures that as exact."""
    d_s, d_t = cfg_s.hidden_size, cfg_t.hidden_size
    k = d_t // d_s if mode == "clone" else 1
    out = []
    if not _power_of_two(math.sqrt(k * d_s / d_t)):
        out.append(f"the norm gains x sqrt({k * d_s}/{d_t})")
    if not _power_of_two(k):
        out.append(f"the residual readers / {k}")
    ffn = ffn_axis(cfg_s.ffn_size, cfg_t.ffn_size, mode)
    q, _ = head_axes(cfg_s.num_heads, cfg_s.n_kv_heads, cfg_t.num_heads, cfg_t.n_kv_heads, mode)
    copies = sorted({int(c) for axis in (ffn, q) for c in axis.src_count.tolist() if c > 1 and not _power_of_two(c)})
    if copies:
        out.append(f"the FFN / head readers / {', '.join(map(str, copies))}")
    if cfg_s.norm == "layernorm" and k * d_s != d_t:
        out.append("the padded residual dims' means")
    if noise == "cancel":
        out.append("the cancelling noise")
    return out


# ---- the tensor map ------------------------------------------------------------------------------------------------
# What each tensor does along the widened axes (layer names without the "layers.{i}." prefix).
TENSOR_KINDS = {
    "embed.tok.weight": "embed",
    "embed.pos.weight": "embed",
    "embed.token_type.weight": "embed",
    "attn.q_proj.weight": "q",
    "attn.q_proj.bias": "q_b",
    "attn.k_proj.weight": "kv",
    "attn.k_proj.bias": "kv_b",
    "attn.v_proj.weight": "kv",
    "attn.v_proj.bias": "kv_b",
    "attn.o_proj.weight": "o",
    "attn.o_proj.bias": "resid_b",
    "mlp.gate_proj.weight": "in",
    "mlp.gate_proj.bias": "in_b",
    "mlp.up_proj.weight": "in",
    "mlp.up_proj.bias": "in_b",
    "mlp.down_proj.weight": "down",
    "mlp.down_proj.bias": "resid_b",
    "lm_head.weight": "head",
    "pooler.dense.weight": "pooler",
    "pooler.dense.bias": "pooler_b",
    "classifier.weight": "cls",
    "classifier.bias": "copy",
}
_NORMS = ("embed.norm", "attn_norm", "mlp_norm", "norm")


def layer_suffix(name: str) -> tuple[int | None, str]:
    """ "layers.3.attn.q_proj.weight" -> (3, "attn.q_proj.weight"); top-level names -> (None, name)."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return int(i), rest
    return None, name


def is_norm(suffix: str) -> bool:
    return suffix.rsplit(".", 1)[0] in _NORMS


class GrowthMap:
    """The map from source to target tensors for one (source config, target config, options)."""

    def __init__(
        self, cfg_s: ModelConfig, cfg_t: ModelConfig, mode: str, depth: str, snr_db: float | None, noise: str, seed: int
    ):
        self.cfg_s, self.cfg_t, self.snr_db, self.noise, self.seed = cfg_s, cfg_t, snr_db, noise, seed
        hd = cfg_s.dim_head
        self.h = hidden_axis(cfg_s.hidden_size, cfg_t.hidden_size, mode)
        self.f = ffn_axis(cfg_s.ffn_size, cfg_t.ffn_size, mode)
        q, kv = head_axes(cfg_s.num_heads, cfg_s.n_kv_heads, cfg_t.num_heads, cfg_t.n_kv_heads, mode)
        self.q, self.kv = q.per_row(hd), kv.per_row(hd)
        self.k = cfg_t.hidden_size // cfg_s.hidden_size if mode == "clone" else 1
        self.ratio = self.k * cfg_s.hidden_size / cfg_t.hidden_size
        self.pre = cfg_s.norm_position == "pre"
        self.fill = "mean" if cfg_s.norm == "layernorm" else "zero"  # what padded residual dims hold
        self.reader_new = "random" if self.pre else "zero"  # pre-norm readers see 0 on the pad
        self.untie = cfg_s.tie_embeddings and not cfg_t.tie_embeddings
        tied_head = cfg_t.tie_embeddings and cfg_t.head == "lm"
        self.compensate = self.k if tied_head and self.k > 1 else 1
        self.head_norm = _head_norm(cfg_t)
        if snr_db is not None and not (self.h.duplicated or self.f.duplicated or self.q.duplicated):
            raise UserError("noise needs duplicated inputs to act on: grow hidden, ffn or heads in clone mode")
        self.slots = layout(cfg_s.num_layers, cfg_t.num_layers, depth)
        self.new_layers = {j for j, s in enumerate(self.slots) if s.new}
        self.post = (
            post_norm_plan(self.slots, cfg_s.embed_norm)
            if not self.pre and self.new_layers
            else PostNormPlan(frozenset(), {})
        )
        self.shapes_s, self.shapes_t = expected_shapes(cfg_s), expected_shapes(cfg_t)
        self.by_source = self._plan()

    def _plan(self) -> dict[str, list[str]]:
        """source name -> the target names made from it, in target order."""
        # target name -> source name: top-level tensors map to themselves, layer j to its slot's source layer
        targets = {name: name for name in self.shapes_s if not name.startswith("layers.")}
        layer0 = [n.split(".", 2)[2] for n in self.shapes_s if n.startswith("layers.0.")]
        for j, slot in enumerate(self.slots):
            for suffix in layer0:
                prefix, leaf = f"layers.{j}.{suffix}".rsplit(".", 1)
                moved = self.post.moved.get(prefix)  # a post-norm LayerNorm that takes another one's affine
                targets[f"layers.{j}.{suffix}"] = f"{moved}.{leaf}" if moved else f"layers.{slot.src}.{suffix}"
        if self.untie:
            targets["lm_head.weight"] = "embed.tok.weight"
        if set(targets) != set(self.shapes_t):  # a bug, not a user error
            raise AssertionError(f"growth plan mismatch: {sorted(set(targets) ^ set(self.shapes_t))[:5]}")
        by_source: dict[str, list[str]] = {}
        for tname, sname in targets.items():
            by_source.setdefault(sname, []).append(tname)
        return by_source

    # -- streaming ------------------------------------------------------------------------------------------------
    def stream(self, src: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        tied_extra = self.cfg_s.tie_embeddings and self.cfg_s.head == "lm"  # a tied lm_head.weight may come along
        if isinstance(src, Mapping):
            names = set(src)
            missing = sorted(set(self.shapes_s) - names)
            unexpected = sorted(names - set(self.shapes_s) - ({"lm_head.weight"} if tied_extra else set()))
            if missing or unexpected:
                what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
                raise UserError(f"growth source: {what} (not a {self.cfg_s.family} model of this config)")
            return self._stream(((n, src[n]) for n in src), tied_extra)
        return self._stream(src, tied_extra)

    def _stream(self, items: Iterable[tuple[str, Tensor]], tied_extra: bool) -> Iterator[tuple[str, Tensor]]:
        seen: set[str] = set()
        for name, t in items:
            if name in seen:
                raise UserError(f"growth source: tensor {name} appears twice")
            seen.add(name)
            if name == "lm_head.weight" and tied_extra:
                if self.cfg_t.tie_embeddings:  # keep the pair a tied state_dict has: the head is the embedding
                    self._check(name, t, self.shapes_s["embed.tok.weight"])
                    yield name, self._make("embed.tok.weight", "embed.tok.weight", t)
                continue
            if name not in self.shapes_s:
                raise UserError(
                    f"growth source: unexpected tensor {name} (not part of this {self.cfg_s.family} config)"
                )
            self._check(name, t, self.shapes_s[name])
            for tname in self.by_source[name]:
                yield tname, self._make(tname, name, t)
        missing = sorted(set(self.shapes_s) - seen)
        if missing:
            raise UserError(f"growth source: missing tensor {missing[0]}")

    @staticmethod
    def _check(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise UserError(
                f"growth source: tensor {name} has shape {list(t.shape)} but the config needs {list(shape)}"
            )
        if not t.is_floating_point():
            raise UserError(f"growth source: tensor {name} has dtype {t.dtype}; growth needs float tensors")

    def _generator(self, tname: str) -> torch.Generator:
        # Seeded per target name: the random parts do not depend on the order tensors arrive in.
        return torch.Generator().manual_seed(self.seed * 0x9E3779B1 % 2**61 + zlib.crc32(tname.encode()))

    def _make(self, tname: str, sname: str, t: Tensor) -> Tensor:
        layer, suffix = layer_suffix(tname)
        if layer in self.new_layers and suffix in ZEROED:
            return torch.zeros(self.shapes_t[tname], dtype=t.dtype)
        x = t.detach()
        if is_norm(suffix):
            out = self._norm(tname, x)
        else:
            kind = "head" if tname == "lm_head.weight" else TENSOR_KINDS[layer_suffix(sname)[1]]
            out = self._weight(kind, x, self._generator(tname))
        assert tuple(out.shape) == self.shapes_t[tname], tname
        out = out.to(t.dtype)
        # An unchanged tensor (depth-only growth) is copied: outputs never alias the source or each other.
        return out.clone() if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else out

    def _norm(self, tname: str, x: Tensor) -> Tensor:
        prefix, leaf = tname.rsplit(".", 1)
        bias = leaf == "bias"
        if prefix in self.post.plain:  # post-norm identity blocks: plain normalisation
            return torch.full((self.h.n_t,), 0.0 if bias else 1.0, dtype=torch.float64)
        out = grow_norm(x, self.h, bias=bias, ratio=self.ratio, pad_bias_mean=not self.pre)
        if prefix == self.head_norm and self.compensate > 1:  # a tied head reads k copies: scale them by 1/k
            out[~self.h.is_new] /= self.compensate
        return out

    def _weight(self, kind: str, x: Tensor, gen: torch.Generator) -> Tensor:
        h, fill, rn = self.h, self.fill, self.reader_new
        reader = Spec(h, rn, divide=True)  # columns reading the residual stream (or the final norm's output)
        if kind == "embed":  # writes the residual along dim 1
            return grow_tensor(x, cols=Spec(h, fill))
        if kind in ("q", "kv", "in"):  # rows: heads or neurons (new ones random); columns read the residual
            rows = {"q": self.q, "kv": self.kv, "in": self.f}[kind]
            return self._noise(grow_tensor(x, Spec(rows, "random"), reader, gen), x, h, gen)
        if kind in ("q_b", "kv_b", "in_b"):
            return grow_tensor(x, Spec({"q_b": self.q, "kv_b": self.kv, "in_b": self.f}[kind]))
        if kind in ("o", "down"):  # rows write the residual; columns read heads or neurons (new ones: zero)
            inner = self.q if kind == "o" else self.f
            return self._noise(grow_tensor(x, Spec(h, fill), Spec(inner, "zero", divide=True), gen), x, inner, gen)
        if kind == "resid_b":
            return grow_tensor(x, Spec(h, fill))
        if kind == "head":
            return self._noise(grow_tensor(x, cols=reader, gen=gen), x, h, gen)
        if kind == "pooler":  # rows: pooled features (copied like the residual, new ones 0 so tanh gives 0)
            return self._noise(grow_tensor(x, Spec(h), reader, gen), x, h, gen)
        if kind == "pooler_b":
            return grow_tensor(x, Spec(h))
        if kind == "cls":  # reads pooled features (0 on new ones) or the final norm's output
            cols = Spec(h, "random" if self.cfg_s.pooler else rn, divide=True)
            return self._noise(grow_tensor(x, cols=cols, gen=gen), x, h, gen)
        return x  # classifier bias: labels do not grow

    def _noise(self, w: Tensor, x: Tensor, axis: Axis, gen: torch.Generator) -> Tensor:
        """Symmetry-breaking noise on the columns of `w` (grown from x) that read duplicated inputs along `axis`:
        std = rms of one copy's share of the weight (rms(x) / copies) / 10^(snr_db / 20)."""
        if self.snr_db is None or not axis.duplicated:
            return w
        sigma = rms(x) / float(axis.count.max()) / 10 ** (self.snr_db / 20)
        return symmetry_noise(w, 1, axis, sigma, self.noise, gen)


def grow(
    cfg: ModelConfig,
    src: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    mode: str = "clone",
    depth: str = "interleave",
    noise_snr_db: float | None = None,
    noise: str = "cancel",
    seed: int = 0,
) -> tuple[ModelConfig, Iterator[tuple[str, Tensor]]]:
    """Grow a model: (target config, iterator of (lmforge name, tensor)), one tensor at a time.

    src: lmforge-named tensors of a `cfg` model: a dict, a lazy mapping, or an iterator of (name, tensor)
    pairs (e.g. from lmforge.io.checkpoints.read_checkpoint). Sizes left None follow `target_config`'s defaults.
    mode: "clone" (duplicate) or "zero" (pad); depth: "interleave" | "top" | "bottom" | "stack" (G_stack, not
    function preserving); noise_snr_db: symmetry-breaking noise (clone mode), noise: "cancel" | "plain".
    Options and sizes are checked before the first tensor is read; the output follows the source's order and
    holds a tied `lm_head.weight` only if the source did."""
    if depth not in DEPTHS:
        raise UserError(f"depth placement {depth!r} is not one of {DEPTHS}")
    if noise not in NOISES:
        raise UserError(f"noise kind {noise!r} is not one of {NOISES}")
    if noise_snr_db is not None and mode != "clone":
        raise UserError("noise is for clone mode: zero mode's new weights are random already")
    cfg_t = target_config(cfg, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, mode=mode)
    growth = GrowthMap(cfg, cfg_t, mode, depth, noise_snr_db, noise, seed)
    return cfg_t, growth.stream(src)


# ---- measuring it --------------------------------------------------------------------------------------------------
def _as_model(cfg: ModelConfig, model: Transformer | Mapping[str, Tensor], dtype: torch.dtype) -> Transformer:
    if isinstance(model, Transformer):
        first = next(model.parameters())
        return (model if first.dtype == dtype else copy.deepcopy(model).to(dtype)).eval()
    from lmforge.io.checkpoints import model_from_tensors

    return model_from_tensors(cfg, model.items(), dtype).eval()


@torch.no_grad()
def check(
    cfg_src: ModelConfig,
    model_src: Transformer | Mapping[str, Tensor],
    cfg_dst: ModelConfig,
    model_dst: Transformer | Mapping[str, Tensor],
    input_ids: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Run source and target on input_ids (B, T) in `dtype` and compare their outputs.

    -> max_rel_logit_error = max|l_t - l_s| / max|l_s|, mean_abs_logit_diff, src_loss / dst_loss (next-token
    loss for LM heads, else None), src_params / dst_params, and what was compared: logits, or for a headless
    model the first d_s dims of the last hidden states (every growth keeps the source's state there)."""
    ms, mt = _as_model(cfg_src, model_src, dtype), _as_model(cfg_dst, model_dst, dtype)
    ls, lt = ms(input_ids), mt(input_ids)
    compared = "logits"
    if cfg_src.head == "none":
        lt, compared = lt[..., : cfg_src.hidden_size], f"hidden[:{cfg_src.hidden_size}]"
    diff = (lt.double() - ls.double()).abs()
    lm = cfg_src.head == "lm" and input_ids.shape[1] > 1
    return {
        "max_rel_logit_error": float(diff.max() / ls.double().abs().max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "src_loss": float(lm_loss(ls[:, :-1], input_ids[:, 1:])) if lm else None,
        "dst_loss": float(lm_loss(lt[:, :-1], input_ids[:, 1:])) if lm else None,
        "src_params": ms.num_params(),
        "dst_params": mt.num_params(),
        "compared": compared,
    }

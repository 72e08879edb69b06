"""AdamW's moments carried through growth, so that training continues from a grown model as it left off.

Why the moments change. Growth maps a source parameter entry w to c target entries, copy i holding a_i * w
(a = 1/k along an axis that *reads* k duplicated inputs, 1 along an axis that *writes* copies; norm gains also
carry sqrt(r) for padded residual dims and 1/k for a tied head's compensation). The grown model computes the
source's function at every source point, so the chain rule gives  sum_i a_i * g_i = g_source,  and by the
symmetry of the copies their gradients are equal:

    g_copy = g_source / A,    A = sum_i a_i = (copy counts of the axes the tensor writes) * (norm factors)

AdamW's moments are running means of g and g^2, so they follow the gradient: m / A and v / A^2 (Staged Training's
m/2, v/4 for doubling: A = 2 for every tensor of a 2x clone except the LM head, which reads 2 copies each
divided by 2 and keeps A = 1). Then m / sqrt(v) is unchanged, and the first AdamW step moves every copied entry
by exactly the update the source would have made to the entry it copies; tests/test_grow_optim.py checks this
invariant. (The step in function space is larger than the source's on reader weights, k copies of w/k each
moved by u: Adam's update does not shrink with the gradient, so no moment transform can change that, only a
per-tensor learning rate.) The step count is kept, so AdamW's bias correction goes on where it was.

What is new gets zero moments: new neurons, heads and padded residual dims (their first AdamW updates then ramp
up over ~10 steps instead of starting at full size), and every tensor of a new identity block; post-norm
LayerNorms made plain get zero moments, the one that takes over their affine gets theirs. Approximate (not
symmetric copies): LayerNorm padding ("average expansion": the pad rows depend on the source rows) and an
untied LM head, which gets the moments the tied embedding had for both of its uses. G_stack copies ("stack")
copy the moments of the layer they copy.

Training checkpoints hold the optimizer state keyed by parameter name (torch.distributed.checkpoint's full
state dict); `read_training_checkpoint` reads one, `grow_optimizer_state` grows its "state", and a grown
checkpoint folder carries the result as OPTIMIZER_STATE_FILE, which `load_optimizer_state` puts into a fresh
optimizer of the grown model.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.surgery.grow import TENSOR_KINDS, GrowthMap, is_norm, layer_suffix, target_config
from lmforge.surgery.grow_depth import DEPTHS
from lmforge.surgery.grow_width import Axis, Spec, grow_tensor

OPTIMIZER_STATE_FILE = "optimizer_state.pt"
FORMAT = "lmforge.grown_optimizer_state"
VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch.optim.AdamW's names for m and v


# ---- the map ---------------------------------------------------------------------------------------------------
def _kind_axes(g: GrowthMap, kind: str) -> tuple[tuple[Axis, bool] | None, tuple[Axis, bool] | None]:
    """(rows, cols) of a tensor kind as (axis, writes): a written axis divides the moments by its copy count,
    a read one keeps them (grow.py's GrowthMap._weight divides the *weights* of read axes instead)."""
    h = g.h
    return {
        "embed": (None, (h, True)),
        "q": ((g.q, True), (h, False)),
        "kv": ((g.kv, True), (h, False)),
        "in": ((g.f, True), (h, False)),
        "q_b": ((g.q, True), None),
        "kv_b": ((g.kv, True), None),
        "in_b": ((g.f, True), None),
        "o": ((h, True), (g.q, False)),
        "down": ((h, True), (g.f, False)),
        "resid_b": ((h, True), None),
        "head": (None, (h, False)),
        "pooler": ((h, True), (h, False)),
        "pooler_b": ((h, True), None),
        "cls": (None, (h, False)),
        "copy": (None, None),
    }[kind]


def _along(v: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


class _MomentMap:
    """The moments' version of grow.py's tensor map, for one (source config, target config, mode, depth)."""

    def __init__(self, cfg_s: ModelConfig, cfg_t: ModelConfig, mode: str, depth: str):
        self.g = GrowthMap(cfg_s, cfg_t, mode, depth, None, "cancel", 0)
        self.source_of = {t: s for s, targets in self.g.by_source.items() for t in targets}

    def grow(self, tname: str, t: Tensor, power: int) -> Tensor:
        """The target moment `tname` from the source moment t: power 1 for m, 2 for v."""
        g = self.g
        sname = self.source_of[tname]
        layer, suffix = layer_suffix(tname)
        prefix, leaf = tname.rsplit(".", 1)
        moved = prefix in g.post.moved  # a post-norm LayerNorm that took over another one's affine
        if not moved and (layer in g.new_layers or prefix in g.post.plain):
            return torch.zeros(g.shapes_t[tname], dtype=t.dtype)
        if is_norm(suffix):
            out = self._norm(prefix, leaf, t, power)
        else:
            kind = "head" if tname == "lm_head.weight" else TENSOR_KINDS[layer_suffix(sname)[1]]
            out = self._weight(kind, t, power)
        assert tuple(out.shape) == g.shapes_t[tname], tname
        return out

    def _weight(self, kind: str, t: Tensor, power: int) -> Tensor:
        rows, cols = _kind_axes(self.g, kind)
        # Copies without division, new entries zero; then the written axes divide by their copy counts.
        out = grow_tensor(
            t, Spec(rows[0], "zero") if rows else None, Spec(cols[0], "zero") if cols else None
        ).clone()  # grow_tensor returns t itself when nothing grows: never alias the source
        for dim, spec in ((0, rows), (1, cols)):
            if spec is not None and spec[1] and spec[0].duplicated:
                out /= _along(spec[0].count.to(out.dtype) ** power, dim, out.dim())
        return out

    def _norm(self, prefix: str, leaf: str, t: Tensor, power: int) -> Tensor:
        g, h = self.g, self.g.h
        out = t.index_select(0, h.safe_src)  # (d_t,)
        out[h.new_idx] = 0
        gain = 1.0 if leaf == "bias" else math.sqrt(g.ratio)  # grow_norm's factor on the copies' gains
        if prefix == g.head_norm and g.compensate > 1:
            gain /= g.compensate  # a tied head reads k copies: the head norm's affine was divided by k
        total = (h.count * gain).to(out.dtype)  # (d_t,) A = copies x factor
        return out / total**power


def grow_optimizer_state(
    cfg: ModelConfig,
    state: Mapping[str, Mapping[str, Tensor]],
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    mode: str = "clone",
    depth: str = "interleave",
) -> tuple[ModelConfig, dict[str, dict[str, Tensor]]]:
    """Grow AdamW's per-parameter state the way `grow` grows the weights (same sizes, mode and depth).

    state: {parameter name: {"step", "exp_avg", "exp_avg_sq"}} of a `cfg` model, e.g. the "state" of a training
    checkpoint's optimizer. Returns (target config, the same for every target parameter whose source parameter
    had a state). Noise options do not matter: the moments are statistics of the gradient, which copies share."""
    if depth not in DEPTHS:
        raise UserError(f"depth placement {depth!r} is not one of {DEPTHS}")
    cfg_t = target_config(cfg, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, mode=mode)
    mm = _MomentMap(cfg, cfg_t, mode, depth)
    shapes_s = mm.g.shapes_s
    for name, st in state.items():
        if name not in shapes_s:
            raise UserError(f"optimizer state: parameter {name} is not part of this {cfg.family} config")
        missing = [k for k in ("step", *MOMENTS) if k not in st]
        if missing:
            raise UserError(f"optimizer state of {name} has no {missing[0]} (not an AdamW state)")
        for k in MOMENTS:
            if tuple(st[k].shape) != shapes_s[name]:
                raise UserError(
                    f"optimizer state: {name}.{k} has shape {list(st[k].shape)}, the parameter {list(shapes_s[name])}"
                )
    out: dict[str, dict[str, Tensor]] = {}
    for tname in mm.g.shapes_t:
        st = state.get(mm.source_of[tname])
        if st is None:
            continue
        step = st["step"]
        out[tname] = {
            "step": step.clone() if isinstance(step, Tensor) else torch.tensor(float(step)),
            "exp_avg": mm.grow(tname, st["exp_avg"].detach(), 1),
            "exp_avg_sq": mm.grow(tname, st["exp_avg_sq"].detach(), 2),
        }
    return cfg_t, out


# ---- files -----------------------------------------------------------------------------------------------------
@dataclass
class TrainingSource:
    """A training checkpoint read for growth: the model, its optimizer's per-parameter state, its step."""

    config: ModelConfig
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, dict[str, Tensor]]
    step: int
    tokenizer_files: dict[str, bytes]


def read_training_checkpoint(path: str | os.PathLike) -> TrainingSource:
    """A run folder (its latest checkpoint) or a checkpoints/step_N folder written by `lmforge train`.

    Tokenizer files come from the run's final/ export, else from the run's data folder (either may be gone)."""
    from lmforge.io.safetensors_stream import read_side_files
    from lmforge.train import checkpoint

    ck = checkpoint.load_checkpoint(path)
    model_cfg = (ck["config"] or {}).get("model")
    if not isinstance(model_cfg, dict):
        raise UserError(f"checkpoint {ck['path']} records no model config")
    cfg = ModelConfig.from_dict(model_cfg)
    optim = ck["optimizer"]
    if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict):
        raise UserError(f"checkpoint {ck['path']} holds no optimizer state")
    state = optim["state"]
    if any(not isinstance(k, str) for k in state):
        raise UserError(f"checkpoint {ck['path']}: optimizer state is not keyed by parameter name")
    model = dict(ck["model"])
    if cfg.tie_embeddings:
        model.pop("lm_head.weight", None)  # the same tensor as embed.tok.weight
    side: dict[str, bytes] = {}
    run_dir = Path(ck["path"]).parent.parent
    data_path = ((ck["config"] or {}).get("data") or {}).get("path")
    for folder in (run_dir / "final", Path(data_path) if data_path else None):
        if folder is not None and folder.is_dir():
            side = read_side_files(folder)
            if side:
                break
    return TrainingSource(cfg, model, state, int(ck["step"]), side)


def optimizer_state_bytes(state: Mapping[str, Mapping[str, Tensor]], step: int) -> bytes:
    """OPTIMIZER_STATE_FILE's content: tensors and plain containers, read back with weights_only=True."""
    buf = io.BytesIO()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "state": {n: {k: v.contiguous() for k, v in st.items()} for n, st in state.items()},
    }
    torch.save(payload, buf)
    return buf.getvalue()


def read_optimizer_state(folder: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """The grown optimizer state a grown checkpoint folder carries (UserError if it has none or it is damaged)."""
    path = Path(folder) / OPTIMIZER_STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {OPTIMIZER_STATE_FILE} (grow it with --optimizer-state)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip or pickle
        raise UserError(f"cannot read {path}: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise UserError(f"{path} is not an lmforge grown optimizer state (format {FORMAT!r}, version {VERSION})")
    return payload["state"]


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: Mapping[str, Mapping[str, Tensor]]
) -> int:
    """Put per-parameter state (by name) into `optimizer`, built over `model`'s parameters and not stepped yet.
    Only the state changes: learning rates, weight decay and the schedule stay the optimizer's own. Returns the
    number of parameters given a state. Plain (or DDP-wrapped) modules; FSDP's sharded parameters are not."""
    params = dict(model.named_parameters())
    index: dict[str, int] = {}
    ids = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[ids[id(p)]] = len(index)  # the numbering Optimizer.state_dict() uses
    for name, st in state.items():
        if name not in index:
            raise UserError(f"optimizer state for {name}, which this model does not train")
        for k in MOMENTS:
            if tuple(st[k].shape) != tuple(params[name].shape):
                raise UserError(f"optimizer state {name}.{k} has shape {list(st[k].shape)}, the model's is "
                                f"{list(params[name].shape)}")  # fmt: skip
    sd = optimizer.state_dict()
    sd["state"] = {index[name]: {k: v for k, v in st.items()} for name, st in state.items()}
    optimizer.load_state_dict(sd)  # casts the moments to each parameter's dtype and device
    return len(state)

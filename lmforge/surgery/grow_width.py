"""Width growth: index maps from target to source dimensions, and the tensor operations built on them.

Every widened dimension is an `Axis`: target index j copies source index `src[j]`, or is new (`src[j] < 0`).
Four axes exist: the residual stream (hidden), the FFN neurons, the query heads and the KV heads (both at
row level: a head is `head_dim` consecutive rows of q/k/v_proj, head_dim never changes).

A tensor either *writes* along an axis (its entries there are outputs: embedding columns, rows of o_proj,
down_proj, gate/up_proj, q/k/v_proj) or *reads* along it (its entries there multiply inputs: columns of
q/k/v/gate/up_proj reading the residual, o_proj columns reading heads, down_proj columns reading neurons).
Writers copy (new entries: zero, the mean of the old ones, or small random values); readers copy and divide
by the number of copies, so that reading [x, x] gives what reading x gave (new entries: zero, or small
random values where the input there is known to be exactly zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import UserError


class Axis:
    """Target index j of one dimension copies source index src[j] (>= 0) or is new (src[j] = -1)."""

    def __init__(self, src: list[int] | Tensor, n_src: int):
        self.src = torch.as_tensor(src, dtype=torch.int64)  # (n_t,)
        self.n_src = n_src
        self.n_t = len(self.src)
        self.is_new = self.src < 0  # (n_t,)
        self.new_idx = self.is_new.nonzero().flatten()
        self.safe_src = self.src.clamp(min=0)  # new entries read index 0, then get overwritten
        self.src_count = torch.bincount(self.src[~self.is_new], minlength=n_src)  # (n_src,) copies of each
        self.count = torch.where(self.is_new, 1, self.src_count[self.safe_src]).double()  # (n_t,) copies of src[j]
        self.duplicated = bool((self.count > 1).any())
        self.identity = self.n_t == n_src and bool((self.src == torch.arange(n_src)).all())
        # Maximal runs of consecutive copies, repeated runs merged: (tgt start, src start, length, repeats); and
        # runs of new entries: (tgt start, offset into the new entries, length). Growing copies whole (repeated)
        # slices with one broadcast copy each, never gathering entry by entry.
        self.copy_runs: list[tuple[int, int, int, int]] = []
        self.new_runs: list[tuple[int, int, int]] = []
        src_list, j, n_new = self.src.tolist(), 0, 0
        while j < self.n_t:
            start, s0 = j, src_list[j]
            if s0 < 0:
                while j < self.n_t and src_list[j] < 0:
                    j += 1
                self.new_runs.append((start, n_new, j - start))
                n_new += j - start
                continue
            while j < self.n_t and src_list[j] == s0 + j - start:
                j += 1
            last = self.copy_runs[-1] if self.copy_runs else None
            if last and last[1:3] == (s0, j - start) and last[0] + last[2] * last[3] == start:
                self.copy_runs[-1] = (last[0], s0, j - start, last[3] + 1)
            else:
                self.copy_runs.append((start, s0, j - start, 1))

    def per_row(self, rows: int) -> Axis:
        """The same map with every entry widened to `rows` consecutive entries (heads -> q/k/v rows)."""
        r = torch.arange(rows)
        src = torch.where(self.is_new[:, None], -1, self.src[:, None] * rows + r[None, :]).flatten()
        return Axis(src, self.n_src * rows)


def hidden_axis(d_s: int, d_t: int, mode: str) -> Axis:
    """Residual dims: clone tiles [x, x, ...] floor(d_t / d_s) times, zero keeps x once; the rest (d_t mod d_s
    in clone mode) is padding that holds 0 (RMSNorm) or the mean of x (LayerNorm)."""
    k = d_t // d_s if mode == "clone" else 1
    return Axis([j % d_s for j in range(k * d_s)] + [-1] * (d_t - k * d_s), d_s)


def ffn_axis(f_s: int, f_t: int, mode: str) -> Axis:
    """FFN neurons: clone duplicates neuron j % f_s (uneven counts are exact: neurons are independent);
    zero appends new neurons."""
    return Axis([j % f_s if mode == "clone" or j < f_s else -1 for j in range(f_t)], f_s)


def head_axes(h_s: int, kv_s: int, h_t: int, kv_t: int, mode: str) -> tuple[Axis, Axis]:
    """(query-head axis, KV-head axis). Target KV head t is a copy of source KV head t % kv_s; the query slots
    of all copies of source KV head s are filled, in order, with source query heads of s's group (cycling), so
    every target query head attends with a copy of the KV head it attended with in the source. In zero mode a
    query slot beyond the first G_s of a source group is a new head, and a KV head with only new query heads is
    new too. Query heads and KV heads keep the grouped order SDPA (repeat_interleave) expects."""
    g_s, g_t = h_s // kv_s, h_t // kv_t
    kv_src = [t % kv_s for t in range(kv_t)]
    q_src = [-1] * h_t
    for s in range(kv_s):
        copies = [t for t in range(kv_t) if kv_src[t] == s]
        if len(copies) * g_t < g_s:
            raise UserError(
                f"cannot grow {h_s} heads / {kv_s} KV heads to {h_t} / {kv_t}: source KV head {s} "
                f"serves {g_s} query heads but its {len(copies)} cop(ies) have only {len(copies) * g_t} "
                "query slots (choose KV heads that are a multiple of the source's, or more query heads)"
            )
        slots = [t * g_t + p for t in copies for p in range(g_t)]
        for u, slot in enumerate(slots):
            q_src[slot] = s * g_s + u % g_s if mode == "clone" or u < g_s else -1
    if mode == "zero":
        kv_src = [s if any(q_src[t * g_t + p] >= 0 for p in range(g_t)) else -1 for t, s in enumerate(kv_src)]
    return Axis(q_src, h_s), Axis(kv_src, kv_s)


def _shape_at(t: Tensor, dim: int, n: int) -> list[int]:
    shape = list(t.shape)
    shape[dim] = n
    return shape


def _along(v: Tensor, t: Tensor, dim: int) -> Tensor:
    """A per-index vector (n,) shaped to broadcast along `dim` of t."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return v.view(shape)


@dataclass(frozen=True)
class Spec:
    """How one dimension of a tensor grows: through `axis`; new entries "zero", "mean" (the mean of the old
    entries, in float64: LayerNorm average expansion) or "random" (N(0, std^2), std that of the old entries:
    inputs of new neurons / heads, columns reading inputs that are exactly zero); `divide`: a reader, each copy
    divided by its count."""

    axis: Axis
    new: str = "zero"
    divide: bool = False


def _new_entries(t: Tensor, dim: int, spec: Spec, n_other: int, gen: torch.Generator | None, std: float) -> Tensor:
    """The values of spec's new entries along `dim`: (n_new, n_other) for dim 0, (n_other, n_new) for dim 1."""
    n_new = len(spec.axis.new_idx)
    shape = [n_new, n_other] if dim == 0 else [n_other, n_new]
    shape = shape[: t.dim()]
    if spec.new == "mean":
        return t.mean(dim, keepdim=True, dtype=torch.float64).to(t.dtype).expand(shape)
    if spec.new == "random" and std > 0:
        return (torch.randn(shape, generator=gen) * std).to(t.dtype)
    if spec.new in ("zero", "random"):
        return t.new_zeros(shape)
    raise ValueError(f"unknown fill {spec.new!r}")


def grow_tensor(
    t: Tensor, rows: Spec | None = None, cols: Spec | None = None, gen: torch.Generator | None = None
) -> Tensor:
    """Grow a (n,) or (n, m) tensor along its rows and/or columns, in t's dtype, into one fresh tensor.

    Rows first, then columns: new rows are made at the source width and then copied across the columns like
    the old ones; new columns span every target row. A reader's division by the copy count is fused into the
    copy (one correctly rounded division per entry)."""
    rows = rows if rows is not None and not rows.axis.identity else None
    cols = cols if cols is not None and not cols.axis.identity else None
    if rows is None and cols is None:
        return t
    t2 = t if t.dim() == 2 else t[:, None]  # (n, m): a vector is one column
    n_rows, n_cols = rows.axis.n_t if rows else t2.shape[0], cols.axis.n_t if cols else t2.shape[1]
    out = torch.empty(n_rows, n_cols, dtype=t.dtype)
    need_std = any(sp is not None and sp.new == "random" and sp.axis.new_runs for sp in (rows, cols))
    std = float(t.std()) if need_std and t.numel() > 1 else 0.0
    div = cols.axis.src_count.clamp(min=1).to(t.dtype) if cols and cols.divide and cols.axis.duplicated else None
    row_runs = [(tr, t2, sr, n, k) for tr, sr, n, k in rows.axis.copy_runs] if rows else [(0, t2, 0, t2.shape[0], 1)]
    if rows and rows.axis.new_runs:
        fill = _new_entries(t2, 0, rows, t2.shape[1], gen, std)
        row_runs += [(tr, fill, off, n, 1) for tr, off, n in rows.axis.new_runs]
    col_runs = cols.axis.copy_runs if cols else [(0, 0, n_cols, 1)]
    for tr, block, sr, nr, kr in row_runs:
        for tc, sc, nc, kc in col_runs:
            # (kr * nr, kc * nc) target block = the (nr, nc) source block broadcast kr x kc times
            dst = out[tr : tr + kr * nr, tc : tc + kc * nc].view(kr, nr, kc, nc)
            src = block[sr : sr + nr, sc : sc + nc].view(1, nr, 1, nc).expand(kr, nr, kc, nc)
            if div is not None:
                torch.div(src, div[sc : sc + nc].view(1, 1, 1, nc), out=dst)
            else:
                dst.copy_(src)
    if cols and cols.axis.new_runs:
        first = cols.axis.copy_runs[0]
        old = out[:, first[0] : first[0] + first[2]]  # one copy of every old column (the hidden axis is uniform)
        k = float(cols.axis.count.max()) if cols.divide else 1.0
        fill = _new_entries(old, 1, cols, n_rows, gen, std / k)
        for tc, off, n in cols.axis.new_runs:
            out[:, tc : tc + n] = fill[:, off : off + n]
    return out if t.dim() == 2 else out[:, 0]


def rms(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t)) / math.sqrt(max(t.numel(), 1))  # a scale: t.dtype is enough


def symmetry_noise(t: Tensor, dim: int, axis: Axis, sigma: float, kind: str, gen: torch.Generator) -> Tensor:
    """Noise of std `sigma` on the entries of `t` (a freshly grown tensor: changed in place) that read
    duplicated inputs along `dim`. cancel (HyperCloning): within each group of copies the noise sums to zero,
    so reading [x, x] is unchanged while the copies' weights differ and get different gradients. plain:
    independent noise, which changes the outputs."""
    if not axis.duplicated:
        return t

    tgt, src, n, k = axis.copy_runs[0]
    if (tgt, src, n) == (0, 0, axis.n_src) and k > 1:
        # The usual layout starts with k whole copies (further copies of some entries, from uneven counts, get
        # no noise: each group still sums to zero). Noise (..., k, n): +N / -N for two copies, else centred.
        # Made in t's dtype: one rounding per weight, and +N / -N are exactly opposite.
        block = t.narrow(dim, 0, k * n).unflatten(dim, (k, n))
        if kind == "plain":
            block.add_(torch.randn(block.shape, generator=gen, dtype=t.dtype), alpha=sigma)
        elif k == 2:
            z = torch.randn(block.narrow(dim, 0, 1).shape, generator=gen, dtype=t.dtype)
            block.narrow(dim, 0, 1).add_(z, alpha=sigma)
            block.narrow(dim, 1, 1).add_(z, alpha=-sigma)
        else:
            z = torch.randn(block.shape, generator=gen)
            mean = sum(z.narrow(dim, i, 1) for i in range(k)) / k
            block.add_(((z - mean) * math.sqrt(k / (k - 1))).to(t.dtype), alpha=sigma)  # unit variance
        return t
    # Any other layout: centre within each group of copies with an index_add over source indices.
    wd = torch.float64 if t.dtype == torch.float64 else torch.float32
    dup = _along(((axis.count > 1) & ~axis.is_new).to(wd), t, dim)  # 1 on duplicated entries
    z = torch.randn(t.shape, generator=gen, dtype=wd) * dup
    if kind == "cancel":
        sums = torch.zeros(_shape_at(t, dim, axis.n_src), dtype=wd).index_add_(dim, axis.safe_src, z)
        count = _along(axis.count.to(wd), t, dim)
        z = (z - sums.index_select(dim, axis.safe_src) / count) * dup
        z = z / torch.sqrt(torch.clamp(1 - 1 / count, min=1e-12))  # centring left variance (1 - 1/c)
    return t.add_(z.to(t.dtype), alpha=sigma)


def grow_norm(t: Tensor, axis: Axis, *, bias: bool, ratio: float, pad_bias_mean: bool) -> Tensor:
    """A norm gain or bias along the residual axis, in float64.

    Copies keep their values, gains times sqrt(ratio) where ratio = (copied dims) / d_t < 1 when the target has
    padding: the padding (0 for RMSNorm, the mean for LayerNorm) shrinks the mean square / variance by exactly
    that ratio, and eps is scaled by it in the config. Padding gains get the mean gain (their input is 0, so
    they only matter for learning); padding biases are 0, so the padding outputs 0 (pad_bias_mean: the mean
    bias, the closest a post-norm LayerNorm can get to the mean of its outputs)."""
    x = t.double()
    out = x.index_select(0, axis.safe_src)
    if not bias:
        out = out * math.sqrt(ratio)
    if len(axis.new_idx):
        fill = x.mean() * math.sqrt(ratio) if not bias else (x.mean() if pad_bias_mean else x.new_zeros(()))
        out[axis.new_idx] = fill
    return out

"""The numerical pieces of fusion: which channels to merge, how to line layers up, how to refit a writer.

Everything works from calibration activations, in float64:

- `cluster(gram, k)`: n channels (hidden dims, neurons, heads) -> k groups, greedily merging the pair of groups
  that loses the least activation energy when the group is replaced by its best rank-1 summary (its top
  eigenvector). Exact duplicates cost nothing, so they merge first and come back exactly.
- `match(corr)`: a one-to-one pairing of two layers' neurons (or heads) by activation correlation.
- `refit(inputs, target)`: the least-squares writer that best reproduces the original output from the fused
  activations, so a merged group's writer compensates for what merging its readers changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Group:
    members: Tensor  # (m,) source channel indices, ascending
    coef: Tensor  # (m,) float64 unit vector: member k ~ coef[k] * the group's summary signal

    @property
    def weights(self) -> Tensor:
        """Convex weights (sum 1) for averaging the members' reader weights: the energy share coef**2."""
        return self.coef**2 / (self.coef**2).sum()


def _top_eig(gram: Tensor) -> tuple[float, Tensor]:
    vals, vecs = torch.linalg.eigh(gram)
    vec = vecs[:, -1]
    if vec.sum() < 0:  # the sign is arbitrary: make the members mostly positive
        vec = -vec
    return vals[-1].item(), vec


def cluster(gram: Tensor, k: int, *, signed: bool = True, max_size: int | None = None) -> list[Group]:
    """Partition n channels, whose activations have Gram matrix `gram` (n, n), into k groups.

    The cost of merging groups p and q (energies l_p, l_q, cross term c) is the energy the best rank-1 summary
    of the pair loses: (l_p + l_q) / 2 - sqrt(((l_p - l_q) / 2)^2 + c^2). signed: anti-correlated channels may
    merge (a residual dimension can be read with a negative coefficient); unsigned: only positive correlation
    counts (a neuron's input weights are averaged, which needs the neurons to agree). max_size caps a group.
    Returns k groups ordered by their first member; k == n gives every channel its own group, unchanged.
    """
    n = gram.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot cluster {n} channels into {k} groups")
    g = gram.double()
    members: list[list[int] | None] = [[i] for i in range(n)]
    owner = torch.arange(n)  # (n,) the group each channel belongs to (groups are named by a slot 0..n-1)
    coef = torch.ones(n, dtype=torch.float64)  # (n,) each channel's coefficient in its group's summary
    cross = g.clone()  # (slots, slots): Gram matrix of the groups' summary signals
    sizes = torch.ones(n, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    inf = float("inf")

    def costs(p: int) -> Tensor:  # (slots,) cost of merging group p with each group
        lp, lq = cross[p, p], cross.diagonal()
        c = cross[p].abs() if signed else cross[p].clamp(min=0)
        cost = (lp + lq) / 2 - torch.sqrt(((lp - lq) / 2) ** 2 + c**2)
        bad = ~alive
        if max_size is not None:
            bad = bad | (sizes[p] + sizes > max_size)
        cost = cost.masked_fill(bad, inf)
        cost[p] = inf
        return cost

    cost = torch.stack([costs(p) for p in range(n)])  # (slots, slots), symmetric
    row_min, row_arg = cost.min(dim=1)  # the cheapest merge of every group: the global one is their minimum
    for _ in range(n - k):
        p = int(torch.argmin(row_min))
        q = int(row_arg[p])
        if not row_min[p] < inf:
            raise ValueError(f"no admissible merge left at {int(alive.sum())} groups (max_size {max_size})")
        p, q = min(p, q), max(p, q)
        merged = sorted(members[p] + members[q])
        idx = torch.tensor(merged)
        energy, vec = _top_eig(g.index_select(0, idx).index_select(1, idx))
        members[p], members[q] = merged, None
        owner[idx], coef[idx] = p, vec
        alive[q] = False
        sizes[p] += sizes[q]
        # <summary_p, summary_j> for every group j: a segment sum over channels, O(n).
        row = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, (vec @ g.index_select(0, idx)) * coef)
        row[~alive] = 0
        row[p] = energy
        cross[p], cross[:, p] = row, row
        new = costs(p)
        cost[q], cost[:, q] = inf, inf
        cost[p], cost[:, p] = new, new
        # A row must be searched again if its best partner died (q) or became dearer (p), or if caps changed;
        # any other row keeps its best unless merging with the new p is cheaper still.
        stale = (row_arg == q) | ((row_arg == p) & (new > row_min))
        if max_size is not None:
            stale |= alive
        stale[p] = True
        better = new < row_min
        row_min = torch.where(better, new, row_min)
        row_arg = torch.where(better, torch.full_like(row_arg, p), row_arg)
        rows = stale.nonzero().flatten()
        if len(rows):
            row_min[rows], row_arg[rows] = cost.index_select(0, rows).min(dim=1)
        row_min[q] = inf
    groups = [Group(torch.tensor(m), coef[torch.tensor(m)]) for m in members if m is not None]
    return sorted(groups, key=lambda grp: int(grp.members[0]))


def equal_groups(n: int, k: int) -> list[Group]:
    """n channels in k contiguous groups of n / k, with equal coefficients (a fallback for KV heads)."""
    size = n // k
    coef = torch.full((size,), size**-0.5, dtype=torch.float64)
    return [Group(torch.arange(j * size, (j + 1) * size), coef) for j in range(k)]


def match(corr: Tensor) -> Tensor:
    """perm (n,) pairing row i with column perm[i] one-to-one, greedily by the largest remaining correlation.
    corr (n, n): correlation of reference item i with candidate j."""
    c = corr.double().clone()
    n = c.shape[0]
    perm = torch.empty(n, dtype=torch.long)
    for _ in range(n):
        flat = int(torch.argmax(c))
        i, j = divmod(flat, n)
        perm[i] = j
        c[i, :] = -float("inf")
        c[:, j] = -float("inf")
    return perm


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """(n, n) cosine similarity between the columns of a (N, n) and of b (N, n)."""
    a = a.double() / a.double().norm(dim=0).clamp(min=1e-30)
    b = b.double() / b.double().norm(dim=0).clamp(min=1e-30)
    return a.T @ b


RIDGES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, float("inf"))  # the held-out grid (inf: the prior alone)


def refit(
    inputs: Tensor,
    target: Tensor,
    *,
    bias: bool,
    ridge: float | None = None,
    prior: Tensor | None = None,
    prior_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The writer W (out, in) [and bias b (out,)] minimising ||inputs @ W.T + b - target||^2 + lam ||W - prior||^2.

    inputs (N, in), target (N, out); prior (out, in) (zero if None) is the writer fusion would use without data
    (the sum of a group's members' columns). lam = ridge x the mean input energy per channel. ridge 0: the
    minimum-norm least-squares step away from the prior, exact whenever the target is a linear function of the
    inputs. ridge None: chosen from RIDGES by the error on the last quarter of the rows (the last calibration
    sequences) of a fit on the other rows, then refitted on all rows: an unregularised refit of a few thousand
    tokens memorises them, with weights many times the source's (seen as a large first gradient in recovery).
    """
    x = inputs.double()
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    p = torch.zeros(target.shape[1], x.shape[1], dtype=torch.float64)  # (out, in [+1])
    if prior is not None:
        p[:, : prior.shape[1]] = prior.double()
    if bias and prior_bias is not None:
        p[:, -1] = prior_bias.double()
    y = target.double() - x @ p.T  # (N, out): what the step away from the prior must add
    held = x.shape[0] // 4 if ridge is None else 0
    fit = _Normal(x[: len(x) - held], y[: len(y) - held])
    if held:
        errors = [((x[-held:] @ fit.step(r) - y[-held:]).pow(2).sum().item(), r) for r in RIDGES]
        ridge = min(errors)[1]
        fit = fit.plus(x[-held:], y[-held:])
    elif ridge is None:
        ridge = RIDGES[3]  # too few rows to hold any out
    w = p + fit.step(ridge).T  # (out, in [+1])
    return (w[:, :-1], w[:, -1]) if bias else (w, None)


class _Normal:
    """The normal equations of min ||x s - y||^2, solved for any ridge through one eigendecomposition."""

    def __init__(self, x: Tensor, y: Tensor, gram: Tensor | None = None, cross: Tensor | None = None):
        self.gram = x.T @ x if gram is None else gram  # (in, in)
        self.cross = x.T @ y if cross is None else cross  # (in, out)
        self.vals, self.vecs = torch.linalg.eigh(self.gram)
        self.proj = self.vecs.T @ self.cross  # (in, out)

    def plus(self, x: Tensor, y: Tensor) -> _Normal:
        return _Normal(x, y, self.gram + x.T @ x, self.cross + x.T @ y)

    def step(self, ridge: float) -> Tensor:
        """(in, out): the ridge solution; at ridge 0 the minimum-norm one (eigenvalues below 1e-12 of the largest
        are treated as zero); at ridge inf, zero."""
        if ridge == float("inf"):
            return torch.zeros_like(self.proj)
        if ridge == 0:
            inv = torch.where(self.vals > 1e-12 * self.vals[-1], 1 / self.vals, torch.zeros_like(self.vals))
        else:
            inv = 1 / (self.vals + ridge * self.gram.diagonal().mean())
        return self.vecs @ (inv[:, None] * self.proj)

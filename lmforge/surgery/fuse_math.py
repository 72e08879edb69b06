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


def refit(inputs: Tensor, target: Tensor, *, bias: bool, ridge: float) -> tuple[Tensor, Tensor | None]:
    """The writer (out, in) [and bias (out,)] minimising ||inputs @ W.T + b - target||^2 + ridge-penalty.

    inputs (N, in), target (N, out). ridge is relative to the mean input energy per channel; 0 = plain least
    squares (minimum-norm), which reproduces the target exactly whenever it is a linear function of the inputs.
    """
    x = inputs.double()
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    y = target.double()
    if ridge > 0:
        a = x.T @ x
        lam = ridge * a.diagonal().mean()
        a = a + lam * torch.eye(a.shape[0], dtype=a.dtype)
        w = torch.linalg.solve(a, x.T @ y)  # (in [+1], out)
    else:
        w = torch.linalg.lstsq(x, y, driver="gelsd").solution
    w = w.T  # (out, in [+1])
    return (w[:, :-1], w[:, -1]) if bias else (w, None)

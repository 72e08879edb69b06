"""The one validation loop: an objective's metrics averaged over a task's fixed validation batches, across ranks.

Each rank evaluates its rows of every global batch in micro-batches; a micro-batch's metrics are weighted by its share
of the rank's rows, summed, divided by the number of batches, then averaged over ranks (all-reduce). So the result is
the mean over batches of each batch's mean, the same for any number of ranks (equal shares) and micro-batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lmforge.train import parallel

Batch = dict[str, Tensor]
ONE_PROCESS = parallel.DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def rows_of_rank(batch: Batch, rank: int, world: int, device: torch.device) -> Batch:
    """This rank's rows (rank::world) of a global batch, on its device."""
    return {k: v[rank::world].to(device, non_blocking=True) for k, v in batch.items()}


def micro_batches(batch: Batch, micro: int) -> list[Batch]:
    """Consecutive slices of `micro` rows (the last may be shorter)."""
    rows = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + micro] for k, v in batch.items()} for i in range(0, rows, micro)]


class Evaluator:
    """Holds this rank's validation micro-batches, each with its weight, and averages any per-micro-batch metrics
    over them. Objectives may add cached tensors to the micro-batches (a teacher's log-probs): they are kept.
    Sums are kept in `accumulate` (the training loop's float32; one-shot scoring after surgery uses float64)."""

    def __init__(self, batches: list[Batch], micro: int, env: parallel.DistEnv, accumulate=torch.float32):
        self.n_batches = len(batches)
        self.parts: list[tuple[Batch, float]] = []  # (micro-batch, its share of its batch's rows on this rank)
        for batch in batches:
            mine = rows_of_rank(batch, env.rank, env.world, env.device)
            rows = next(iter(mine.values())).shape[0]
            self.parts += [(mb, next(iter(mb.values())).shape[0] / rows) for mb in micro_batches(mine, micro)]
        self.device, self.accumulate = env.device, accumulate

    @torch.no_grad()
    def run(self, metrics_of: Callable[[Batch], dict[str, Tensor]]) -> dict[str, float]:
        """{name: mean over the validation batches} of metrics_of(micro-batch), all-reduced over ranks."""
        return self.run_with_rows(lambda mb: (metrics_of(mb), None))[0]

    @torch.no_grad()
    def run_with_rows(
        self, step_of: Callable[[Batch], tuple[dict[str, Tensor], dict[str, Tensor] | None]]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """step_of(micro-batch) -> (means, rows): the means averaged as `run` does, and the per-row outputs (first
        dimension the row: predictions, labels) concatenated over every micro-batch of every rank, for scores that
        need all predictions at once (F1, correlations)."""
        totals: dict[str, Tensor] = {}
        rows: dict[str, list[Tensor]] = {}
        for mb, share in self.parts:
            means, outputs = step_of(mb)
            for name, value in means.items():
                total = totals.setdefault(name, torch.zeros((), dtype=self.accumulate, device=self.device))
                total += value * share
            for name, value in (outputs or {}).items():
                rows.setdefault(name, []).append(value.detach().cpu())
        means = {name: parallel.all_reduce_mean(t / self.n_batches).item() for name, t in totals.items()}
        return means, {name: torch.cat(parallel.gather_cpu(torch.cat(parts))) for name, parts in rows.items()}

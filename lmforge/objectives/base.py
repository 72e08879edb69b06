"""What the training loop asks of an objective.

An objective is an `nn.Module`, so whatever it learns besides the model (an uncertainty module's log-variances, a
projection between widths) is an ordinary parameter: the loop hands `objective.parameters()` to the optimizer next to
the model's and saves `objective.state_dict()` in every checkpoint, so a resume restores it. A frozen helper that must
not be trained or saved (a teacher) is kept outside the module tree (see objectives/distill.py).

The loop calls, on every rank:

    prepare(trainer)                 once, after the model, task and evaluator exist and before anything is written
    forward(model, batch)            one training micro-batch -> (loss, {name: detached scalar tensor})
    val_metrics(model, batch)        one validation micro-batch -> {name: scalar tensor}, averaged by the evaluator
    val_step(model, batch)           (val_metrics, per-row outputs or None): an objective whose scores need every
                                     prediction at once (F1, correlations) returns rows, gathered over all batches
    finish_validation(values, rows)  the numbers logged: derived ones (perplexity, a reference model's own loss,
                                     scores of the gathered rows) from the averages
    summary(val_start, val_end, tokens)   keys the run's final summary adds

A batch is a dict of tensors whose first dimension is the sequence; the task decides which keys it holds.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

Batch = dict[str, Tensor]


class Objective(nn.Module):
    def prepare(self, trainer: Any) -> None:
        """Set-up that needs the built model, device or data (e.g. loading a teacher); may raise UserError."""

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def val_metrics(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def val_step(
        self, model: nn.Module, batch: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        return self.val_metrics(model, batch), None

    def finish_validation(self, values: dict[str, float], rows: dict[str, Tensor] | None = None) -> dict[str, float]:
        return values

    def summary(self, val_start: dict[str, float], val_end: dict[str, float], tokens: int) -> dict[str, Any]:
        return {}

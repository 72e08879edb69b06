"""Multi-task training: each batch is one task's; its loss goes through the task's branch and head only.

How the task losses L_i are combined (multitask.weighting):
- "fixed": w_i L_i with the recipe's weights (all 1 by default: the plain sum, which recent work finds hard to beat);
- "uncertainty" (Kendall et al. 2018): L_i exp(-s_i) + s_i with a learned log-variance s_i per task (an ordinary
  parameter of this objective, saved and resumed). Nothing is clipped: the total goes negative once some
  s_i < 0 and L_i is small, which is what the method's formula does; clipping s_i (what users of it often add)
  would be another method. The s_i are logged (log_var_<task>).
- "loss_ratio" (a GradNorm-style balance without the extra backward passes): w_i = (Lbar_i / L_i(0))^alpha,
  normalised to mean 1 over the tasks, where Lbar_i is a running mean (0.9) of task i's training loss and L_i(0) its
  first one: a task that has learned less (relative to where it started) weighs more. The weight is a constant in
  the backward pass; the running means are buffers, saved and resumed.
Logged per step: loss_<task> of the batch's task. Validation: per task val_<task>_loss and its scores (accuracy,
F1, ... as for `lmforge finetune`), val_loss the mean of the task losses, val_score the mean of each task's headline
metric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import UserError
from lmforge.metrics.classification import classification_scores
from lmforge.objectives.base import Batch, Objective
from lmforge.train import parallel

WEIGHTING = ("fixed", "uncertainty", "loss_ratio")


class MultiTaskClassification(Objective):
    def __init__(self, names: list[str], kinds: list[str], num_labels: list[int], metrics: list[str],
                 weighting: str = "fixed", weights: tuple[float, ...] = (), alpha: float = 1.0):  # fmt: skip
        super().__init__()
        if weighting not in WEIGHTING:
            raise UserError(f"multitask.weighting must be one of {', '.join(WEIGHTING)}, got {weighting!r}")
        if weights and (len(weights) != len(names) or min(weights) < 0):
            raise UserError(f"multitask.task_weights: one weight >= 0 per task ({len(names)}), got {list(weights)}")
        self.names, self.kinds, self.num_labels, self.metrics = names, kinds, num_labels, metrics
        self.weighting, self.fixed, self.alpha = weighting, list(weights) or [1.0] * len(names), alpha
        n = len(names)
        self.log_var = nn.Parameter(torch.zeros(n)) if weighting == "uncertainty" else None
        self.register_buffer("first_loss", torch.full((n,), math.nan))
        self.register_buffer("mean_loss", torch.full((n,), math.nan))

    def _loss(self, task: int, logits: Tensor, labels: Tensor) -> Tensor:
        if self.kinds[task] == "regression":
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def _ratio_weight(self, task: int, loss: Tensor) -> Tensor:
        value = parallel.all_reduce_mean(loss.detach())  # the same buffers on every rank
        with torch.no_grad():
            if not torch.isfinite(value):  # a step the loop will skip: the running means stay as they were
                return torch.ones((), device=loss.device)
            if math.isnan(self.first_loss[task].item()):
                self.first_loss[task] = value
                self.mean_loss[task] = value
            else:
                self.mean_loss[task] = 0.9 * self.mean_loss[task] + 0.1 * value
            ratio = (self.mean_loss / self.first_loss) ** self.alpha  # nan for tasks not seen yet
            seen = ~torch.isnan(ratio)
            return ratio[task] / ratio[seen].mean()

    def forward(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        task = int(batch["task"][0])
        logits = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), task=task)
        loss = self._loss(task, logits, batch["labels"])
        metrics = {f"loss_{self.names[task]}": loss.detach()}
        if self.weighting == "uncertainty":
            s = self.log_var[task]
            metrics |= {f"log_var_{name}": v.detach() for name, v in zip(self.names, self.log_var)}
            return loss * torch.exp(-s) + s, metrics
        if self.weighting == "loss_ratio":
            w = self._ratio_weight(task, loss)
            metrics[f"weight_{self.names[task]}"] = w
            return w * loss, metrics
        return self.fixed[task] * loss, metrics

    def val_metrics(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return self.val_step(model, batch)[0]

    def val_step(self, model: nn.Module, batch: Batch) -> tuple[Batch, Batch]:
        task = int(batch["task"][0])
        logits = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), task=task)
        width = max(self.num_labels)
        pred = torch.full((logits.shape[0], width), math.nan, device=logits.device)
        pred[:, : logits.shape[1]] = logits.float()
        rows = {"pred": pred, "label": batch["labels"].float(), "task": batch["task"]}
        return {}, rows  # the losses and scores come from the gathered rows, task by task

    def finish_validation(self, values: dict[str, float], rows: Batch | None = None) -> dict[str, float]:
        out, losses, scores = {}, [], []
        for i, name in enumerate(self.names):
            mine = rows["task"] == i
            pred, label = rows["pred"][mine][:, : self.num_labels[i]], rows["label"][mine]
            if self.kinds[i] == "classification":
                label = label.long()
            loss = self._loss(i, pred, label).item()
            classes = self.num_labels[i] if self.kinds[i] == "classification" else 0
            got = classification_scores(pred, label.tolist(), classes)
            out[f"val_{name}_loss"] = loss
            out |= {f"val_{name}_{k}": v for k, v in got.items()}
            losses.append(loss)
            scores.append(got[self.metrics[i]])
        return {"val_loss": sum(losses) / len(losses), "val_score": sum(scores) / len(scores), **out}

    def summary(self, val_start: dict[str, float], val_end: dict[str, float], tokens: int) -> dict:
        return {k: v for k, v in val_end.items() if k.startswith(("val_", "test_"))}

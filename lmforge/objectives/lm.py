"""Language modelling: next-token cross-entropy, the pre-training objective."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.objectives.base import Objective


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in float32; logits (B, T, V) and targets (B, T), already shifted."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def perplexity(loss: float) -> float:
    """exp(loss), saturating: a diverged run reads as a huge number, not an overflow."""
    return math.exp(min(loss, 700.0))


class LanguageModelling(Objective):
    """Batches {"input_ids", "labels"} (B, T); logs val_loss, the mean next-token loss on the validation batches."""

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return lm_loss(model(batch["input_ids"]), batch["labels"]), {}

    def val_metrics(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"val_loss": lm_loss(model(batch["input_ids"]), batch["labels"])}


def split_loss(model: nn.Module, data, n_batches: int, batch_size: int, seq_len: int) -> float:
    """Mean next-token loss of `model` (in eval mode, one process) over n_batches fixed batches of windows spread
    evenly over a token dataset split (lmforge.data.tokens.TokenDataset), summed in float64: one-shot scoring."""
    import torch

    from lmforge.train.evaluate import ONE_PROCESS, Evaluator

    batches = [{"input_ids": x, "labels": y} for x, y in data.val_batches(n_batches, batch_size, seq_len)]
    evaluator = Evaluator(batches, batch_size, ONE_PROCESS, torch.float64)
    return evaluator.run(lambda mb: LanguageModelling().val_metrics(model.eval(), mb))["val_loss"]

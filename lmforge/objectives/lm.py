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

"""AdamW with decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.train.recipe import OptimConfig


def _decay_groups(module: nn.Module, oc: OptimConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        table = name.startswith("embed.") or ".embed." in name  # an embedding, also a multi-task trunk's
        (decay if p.dim() >= 2 and not table else no_decay).append(p)
    return [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, oc: OptimConfig, fused: bool, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters and, in groups of their own, `extra`'s (an objective's learned
    parameters); weight decay on matrices only (not on norms, biases or embedding tables)."""
    groups = _decay_groups(model, oc)
    if extra is not None:
        groups += [g for g in _decay_groups(extra, oc) if g["params"]]
    return torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=fused)


def lr_factor(step: int, oc: OptimConfig, total: int) -> float:
    """Multiplier of oc.lr at `step` (0-based): linear warm-up, then cosine/linear decay to min_lr_ratio."""
    if step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - oc.warmup_steps) / max(1, total - oc.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if oc.schedule == "cosine" else 1 - progress
    return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * shape

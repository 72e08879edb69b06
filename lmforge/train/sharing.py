"""Share, then untie: layers trained as one shared unit per group, then each on its own (Yang et al. 2021).

A recipe's `share` section turns it on:

    share:
      groups: all            # all | consecutive (blocks of `size`) | cycle (layer i uses unit i mod size) | none
      size: 0
      parts: [attn, mlp, norms]
      untie_fraction: 0.1    # untie at 10% of train.steps; or untie_step, untie_flops, untie_plateau,
                             # grad_corr_below (the gradient condition); the first that holds unties

How sharing is kept. Every layer keeps its own parameters, equal within a group from the start; after each backward
pass every copy receives the group's MEAN gradient, so the copies see identical updates (AdamW is elementwise and
deterministic) and stay bitwise equal: the model computes what one shared unit would, with the FLOPs of every use.
Untying is stopping the averaging. Nothing else changes at that step: the weights, hence the logits, are the same,
and each copy's AdamW moments are those of the shared unit, already on the scale of one copy's gradient. (Tying by
one Parameter used n times instead gives the unit the SUM of the n gradients; copying its moments to n untied layers
would then make the next updates too small for about 1/(1 - beta2) steps.) The price: the copies cost memory like
an untied model (the paper's alternative formulation), and export, FSDP sharding and the KV cache need nothing
special, one entry per layer position.

The gradient condition (the paper's adaptive rule): every `grad_every` steps while tied, the Pearson correlation
of the gradients of adjacent layers of a group (over the shared tensors) is measured before averaging; when at least
`grad_quorum` of the adjacent pairs are below `grad_corr_below` for `grad_checks` checks in a row, the layers untie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.surgery.tie import check_parts, shared_names, sharing_groups, tie_state
from lmforge.train.stop import FlopsBudget, Plateau, StepLimit, StopRule


@dataclass(frozen=True)
class ShareConfig:
    groups: str = "none"  # none | all | consecutive | cycle
    size: int = 0  # consecutive: layers per group; cycle: number of units
    parts: tuple[str, ...] = ("attn", "mlp", "norms")
    init: str = "first"  # how the copies start equal: first (a fresh init) | mean (a trained train.init_from)
    untie_step: int = 0  # untie after this optimizer step (0: not by step)
    untie_fraction: float = 0.0  # ... after this fraction of train.steps
    untie_flops: float = 0.0  # ... once the training FLOPs reach this
    untie_plateau: int = 0  # ... after this many evaluations without a val_loss gain of plateau_min_delta
    plateau_min_delta: float = 0.01
    grad_corr_below: float = 0.0  # the gradient condition (0: off)
    grad_quorum: float = 0.5  # share of adjacent pairs that must be below it
    grad_checks: int = 3  # checks in a row
    grad_every: int = 10  # steps between checks


@dataclass
class UntieState:
    untied_at: int | None = None  # the optimizer step after which the layers were untied
    reason: str | None = None
    checks_below: int = 0
    rules: dict[str, Any] = field(default_factory=dict)


class LayerSharing:
    """The component the trainer calls: `tie(state)` before training, `after_backward(model)` each step,
    `after_step(step, flops, val)` after each step's evaluation (returns the untie event, if any)."""

    def __init__(self, sc: ShareConfig, num_layers: int, total_steps: int):
        self.sc = sc
        self.parts = check_parts(sc.parts)
        self.groups = sharing_groups(num_layers, sc.groups, sc.size)
        if not self.groups:
            raise UserError(f"share.groups {sc.groups!r} with size {sc.size} shares no layers")
        if sc.init not in ("first", "mean"):
            raise UserError(f"share.init must be first or mean, got {sc.init!r}")
        if not 0 <= sc.untie_fraction <= 1 or min(sc.untie_step, sc.untie_flops, sc.untie_plateau) < 0:
            raise UserError("share.untie_*: a step, a fraction of train.steps in [0, 1], FLOPs or a patience >= 0")
        if sc.grad_corr_below and (sc.grad_every < 1 or sc.grad_checks < 1 or not 0 < sc.grad_quorum <= 1):
            raise UserError("share.grad_every and share.grad_checks must be >= 1, share.grad_quorum in (0, 1]")
        self.rules: list[StopRule] = []
        at_fraction = max(1, round(sc.untie_fraction * total_steps)) if sc.untie_fraction else 0
        steps = [s for s in (sc.untie_step, at_fraction) if s]
        if steps:
            self.rules.append(StepLimit(min(steps)))
        if sc.untie_flops:
            self.rules.append(FlopsBudget(sc.untie_flops))
        if sc.untie_plateau:
            self.rules.append(Plateau("val_loss", sc.untie_plateau, sc.plateau_min_delta))
        self.state = UntieState()
        self.last_corr: float | None = None  # the mean adjacent-layer gradient correlation of the latest check
        self.checked = False  # whether this step's backward ran a check (its value is logged with the step)

    @property
    def tied(self) -> bool:
        return self.state.untied_at is None

    def tie(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's state with each group's copies made equal (share.init), for a fresh run."""
        return tie_state(state, self.groups, self.parts, self.sc.init)

    def _pairs(self, model) -> list[list[list[Tensor]]]:
        """For each group, for each layer of it, the shared parameters (same order in every layer)."""
        names = shared_names([n for n, _ in model.layers[0].named_parameters()], self.parts)
        out = []
        for group in self.groups:
            params = [dict(model.layers[i].named_parameters()) for i in group]
            out.append([[p[n] for n in names] for p in params])
        return out

    @torch.no_grad()
    def after_backward(self, model, step: int) -> None:
        """While tied: check the gradient condition when due, then give every copy the group's mean gradient."""
        self.checked = False
        if not self.tied:
            return
        groups = self._pairs(model)
        self.checked = bool(self.sc.grad_corr_below) and step % self.sc.grad_every == 0
        if self.checked:
            self._check_gradients(groups)
        for layers in groups:
            for tensors in zip(*layers):  # one shared tensor, in every layer of the group
                grads = [_local(t.grad) for t in tensors]
                mean = torch.stack(grads).mean(0)
                for g in grads:
                    g.copy_(mean)

    def _check_gradients(self, groups) -> None:
        corrs = []
        for layers in groups:
            flat = [torch.cat([_local(t.grad).float().flatten() for t in tensors]) for tensors in layers]
            for a, b in zip(flat, flat[1:]):
                corrs.append(_pearson(a, b, sharded=_is_sharded(layers[0][0])))
        below = sum(c < self.sc.grad_corr_below for c in corrs) / len(corrs)
        self.last_corr = sum(corrs) / len(corrs)
        self.state.checks_below = self.state.checks_below + 1 if below >= self.sc.grad_quorum else 0

    def after_step(self, step: int, flops: float, val: dict[str, float] | None) -> str | None:
        """Untie when a condition holds; returns its name once, at the step it happened."""
        if not self.tied:
            return None
        fired = [rule.name for rule in self.rules if rule(step, flops, val)]  # every rule sees every evaluation
        if self.sc.grad_corr_below and self.state.checks_below >= self.sc.grad_checks:
            fired.append("gradients")
        if not fired:
            return None
        self.state.untied_at, self.state.reason = step, fired[0]
        return fired[0]

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        rules = {rule.name: rule.state_dict() for rule in self.rules}
        return {"untied_at": s.untied_at, "reason": s.reason, "checks_below": s.checks_below, "rules": rules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = UntieState(state.get("untied_at"), state.get("reason"), int(state.get("checks_below", 0)))
        for rule in self.rules:
            rule.load_state_dict(state.get("rules", {}).get(rule.name, {}))


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2: every layer's copy of a tensor is sharded alike), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _is_sharded(t: Tensor) -> bool:
    return hasattr(t, "to_local")


def _pearson(a: Tensor, b: Tensor, sharded: bool) -> float:
    """Pearson correlation of two vectors; of the whole vectors when each rank holds a shard of them."""
    sums = torch.stack([a.sum(), b.sum(), (a * b).sum(), (a * a).sum(), (b * b).sum()]).double()
    n = torch.tensor(float(a.numel()), dtype=torch.float64)
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(n)
    sa, sb, sab, saa, sbb = sums.tolist()
    n = n.item()
    cov = sab - sa * sb / n
    var = (saa - sa * sa / n) * (sbb - sb * sb / n)
    return cov / var**0.5 if var > 0 else 0.0

"""Stop rules: when to end training before the step budget (train.steps) runs out.

A rule is asked after every optimizer step with the step, the training FLOPs so far and that step's validation
metrics (None when there was no evaluation); it answers True to stop. Every rank asks with the same all-reduced
numbers, so every rank stops together. A rule with memory (a plateau's best value) keeps it in state_dict(), which
each checkpoint records and a resume restores. The run's summary names the rule that ended it ("stopped_by").
"""

from __future__ import annotations

from typing import Any


class StopRule:
    name = "rule"

    def __call__(self, step: int, flops: float, val: dict[str, float] | None) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StepLimit(StopRule):
    """Stop after `steps` optimizer steps, on a schedule that may be longer (train.steps)."""

    name = "steps"

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, step: int, flops: float, val: dict[str, float] | None) -> bool:
        return step >= self.steps


class FlopsBudget(StopRule):
    """Stop once the training FLOPs reach `flops`."""

    name = "flops"

    def __init__(self, flops: float):
        self.flops = flops

    def __call__(self, step: int, flops: float, val: dict[str, float] | None) -> bool:
        return flops >= self.flops


class Threshold(StopRule):
    """Stop at the first evaluation where `metric` <= `at_most`."""

    def __init__(self, metric: str, at_most: float, name: str | None = None):
        self.metric, self.at_most = metric, at_most
        self.name = name or f"{metric}_threshold"

    def __call__(self, step: int, flops: float, val: dict[str, float] | None) -> bool:
        return val is not None and val[self.metric] <= self.at_most


class Plateau(StopRule):
    """Stop after `patience` evaluations in a row that did not lower the best `metric` by more than the fraction
    `min_delta` of it."""

    name = "plateau"

    def __init__(self, metric: str, patience: int, min_delta: float):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.best: float | None = None
        self.evals_without_gain = 0

    def __call__(self, step: int, flops: float, val: dict[str, float] | None) -> bool:
        if val is None:
            return False
        value = val[self.metric]
        if self.best is None or value < self.best * (1 - self.min_delta):
            self.best, self.evals_without_gain = value, 0
            return False
        self.evals_without_gain += 1
        return self.evals_without_gain >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "evals_without_gain": self.evals_without_gain}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.evals_without_gain = int(state.get("evals_without_gain", 0))

"""Several labelled tasks as one training task: each batch drawn from one task, which task chosen per step.

Sampling: "proportional" (task i with probability n_i / sum n, its training examples), "temperature"
(n_i^(1/T), normalised: T = 1 is proportional, larger T flattens towards uniform) or "round_robin" (the tasks in
turn). The choice of batch k is a pure function of (seed, k), and each task keeps its own batch position
(train/task.py LabelledText), so a resume restores every position exactly. Every batch carries "task" (B,), the
task's index. Validation and test: every task's batches, one after another, each tagged the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.train.task import ExampleBatches, LabelledText

SAMPLING = ("proportional", "temperature", "round_robin")


def task_probabilities(sizes: list[int], sampling: str, temperature: float) -> list[float] | None:
    """Each task's probability of being drawn (None for round robin)."""
    if sampling not in SAMPLING:
        raise UserError(f"multitask.sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    if sampling == "round_robin":
        return None
    if not temperature > 0:
        raise UserError(f"multitask.temperature must be > 0, got {temperature}")
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    w = np.asarray(sizes, dtype=np.float64) ** power
    return (w / w.sum()).tolist()


class TaskMixture:
    head = "classifier"
    fixed_shape = False  # batches differ in length: the loop counts their tokens and FLOPs one by one

    def __init__(self, names: list[str], tasks: list[LabelledText], sampling: str, temperature: float, seed: int):
        self.names, self.tasks, self.seed = names, tasks, seed
        self.probs = task_probabilities([len(t.encoded["train"]) for t in tasks], sampling, temperature)
        self.drawn = 0
        self.tokenizer_files = tasks[0].tokenizer_files
        self.eval_micro = None

    def task_of(self, k: int) -> int:
        if self.probs is None:
            return k % len(self.tasks)
        return int(np.random.default_rng([self.seed % (1 << 64), k, 7]).choice(len(self.tasks), p=self.probs))

    def check_model(self, model) -> None:
        for name, task in zip(self.names, self.tasks):
            data = task.data
            want = len(data.labels) if data.kind == "classification" else 1
            if model.num_labels[name] != want:
                raise UserError(
                    f"the model's head for {name} has {model.num_labels[name]} outputs; the task needs {want}"
                )

    def next_batch(self) -> dict[str, Tensor]:
        i = self.task_of(self.drawn)
        batch = self.tasks[i].next_batch()
        self.drawn += 1
        return {**batch, "task": torch.full((batch["input_ids"].shape[0],), i, dtype=torch.long)}

    def val_batches(self, split: str = "val") -> list[dict[str, Tensor]]:
        out = []
        for i, task in enumerate(self.tasks):
            for batch in task.val_batches(split):
                out.append({**batch, "task": torch.full((batch["input_ids"].shape[0],), i, dtype=torch.long)})
        return out

    batch_tokens = staticmethod(ExampleBatches.batch_tokens)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "seed": self.seed, "tasks": [t.state_dict() for t in self.tasks]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or len(state.get("tasks", [])) != len(self.tasks):
            raise UserError("cannot resume the data position: the seed or the tasks differ")
        self.drawn = int(state["drawn"])
        for task, s in zip(self.tasks, state["tasks"]):
            task.load_state_dict(s)

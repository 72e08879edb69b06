"""Faults during training: a non-finite step is skipped without touching the weights, a run that keeps diverging stops
with its last checkpoint intact, and SIGTERM saves a checkpoint from which --resume continues the same run."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import Diverged, Interrupted
from lmforge.objectives.lm import LanguageModelling
from lmforge.train.loop import Trainer
from lmforge.train.recipe import load_recipe
from tests.test_train import losses, recipe_file


class Faulty(LanguageModelling):
    """Language modelling whose loss is NaN at the given steps (counted by forward calls, one per step here)."""

    def __init__(self, bad_steps: set[int], signal_at: int | None = None):
        super().__init__()
        self.calls, self.bad, self.signal_at = 0, bad_steps, signal_at

    def forward(self, model, batch):
        self.calls += 1
        loss, metrics = super().forward(model, batch)
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler notes it; the step finishes, then the run stops
        return (loss * math.nan if self.calls in self.bad else loss), metrics


def rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_non_finite_step_is_skipped_counted_and_logged(tmp_path, data_dir):
    t = Trainer(load_recipe(recipe_file(tmp_path, data_dir, sample_prompts=[])), objective=Faulty({3}))
    t.train_step(), t.train_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in t.optimizer.state.items()}
    t.train_step()  # NaN loss: no update
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(torch.equal(moments[id(p)][k], v) for p, s in t.optimizer.state.items() for k, v in s.items())
    assert t.skipped_steps == 1 and t.step == 3
    t.train_step()
    assert t.bad_steps == 0 and not all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())

    run = tmp_path / "again"
    summary = Trainer(load_recipe(recipe_file(run, data_dir, sample_prompts=[])), objective=Faulty({3})).run()
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["val_loss"])
    assert [r["step"] for r in rows(run / "run") if r.get("event") == "skipped_nonfinite"] == [3]


def test_a_run_that_keeps_diverging_stops_and_keeps_its_last_checkpoint(tmp_path, data_dir, capsys):
    r = recipe_file(tmp_path, data_dir, steps=20, ckpt_every=2, max_bad_steps=3, sample_prompts=[])
    t = Trainer(load_recipe(r), objective=Faulty(set(range(5, 100))))
    with pytest.raises(Diverged, match=r"3 steps in a row .*to step 7.* step_000006, is intact") as e:
        t.run()
    assert "lower optim.lr" in str(e.value)
    # steps 5 and 6 were skipped, so the step-6 checkpoint holds step 4's weights: finite, and the run resumes from it
    from lmforge.train.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_sigterm_saves_a_checkpoint_and_resume_continues_the_same_run(tmp_path, data_dir, capsys):
    full = recipe_file(tmp_path / "a", data_dir, sample_prompts=[])
    Trainer(load_recipe(full)).run()
    cut = recipe_file(tmp_path / "b", data_dir, sample_prompts=[])
    with pytest.raises(Interrupted, match="SIGTERM at step 4: checkpoint saved") as e:
        Trainer(load_recipe(cut), objective=Faulty(set(), signal_at=4)).run()
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone
    assert main(["train", str(cut), "--resume"]) == 0
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")  # each step once, the same losses

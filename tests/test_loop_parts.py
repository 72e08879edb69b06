"""The loop's parts: an objective with parameters of its own, stop rules, the evaluator, and the experiment
harness's statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lmforge.experiments.harness import lr_search, paired_bootstrap, spread
from lmforge.objectives.base import Objective
from lmforge.objectives.lm import lm_loss
from lmforge.train.evaluate import ONE_PROCESS, Evaluator
from lmforge.train.loop import Trainer
from lmforge.train.recipe import load_recipe
from lmforge.train.stop import FlopsBudget, Plateau, StepLimit, Threshold
from tests.test_train import losses, recipe_file


class TemperedLM(Objective):
    """Next-token loss on logits scaled by a learned temperature exp(log_t): a parameter outside the model."""

    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))

    def forward(self, model, batch):
        loss = lm_loss(model(batch["input_ids"]) * self.log_t.exp(), batch["labels"])
        return loss, {"log_t": self.log_t.detach()}

    def val_metrics(self, model, batch):
        return {"val_loss": lm_loss(model(batch["input_ids"]), batch["labels"])}


def test_an_objectives_parameters_train_and_resume_exactly(tmp_path, data_dir):
    full = Trainer(load_recipe(recipe_file(tmp_path / "a", data_dir)), objective=TemperedLM())
    assert any(p is full.objective.log_t for g in full.optimizer.param_groups for p in g["params"])
    full.run()
    assert full.objective.log_t.item() != 0.0  # it trained
    logged = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    assert [r["log_t"] for r in logged if "log_t" in r][-1] == pytest.approx(full.objective.log_t.item(), abs=0.1)

    cut = recipe_file(tmp_path / "b", data_dir, ckpt_every=3)
    t = Trainer(load_recipe(cut), objective=TemperedLM())
    for _ in range(3):
        t.train_step()
    t.save()
    del t
    resumed = Trainer(load_recipe(cut), objective=TemperedLM(), resume=True)
    assert resumed.objective.log_t.item() != 0.0  # restored from the checkpoint, not re-initialised
    resumed.run()
    assert losses(tmp_path / "b" / "run")[-3:] == losses(tmp_path / "a" / "run")[-3:]
    assert resumed.objective.log_t.item() == full.objective.log_t.item()


def test_stop_rules():
    assert not StepLimit(3)(2, 0.0, None) and StepLimit(3)(3, 0.0, None)
    assert not FlopsBudget(1e9)(1, 9.9e8, None) and FlopsBudget(1e9)(1, 1e9, None)
    th = Threshold("val_kl", 0.5, name="stop_kl")
    assert th.name == "stop_kl" and not th(1, 0, None) and not th(1, 0, {"val_kl": 0.6}) and th(1, 0, {"val_kl": 0.5})
    p = Plateau("val_loss", patience=2, min_delta=0.1)
    seq = [3.0, 2.0, 1.95, 1.9, 1.7]  # 1.95 and 1.9 are within 10% of 2.0: the second of them stops it
    assert [p(i, 0, {"val_loss": v}) for i, v in enumerate(seq[:4])] == [False, False, False, True]
    q = Plateau("val_loss", patience=2, min_delta=0.1)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == {"best": 2.0, "evals_without_gain": 2}
    assert not p(5, 0, None)  # no evaluation this step: no change


def test_evaluator_averages_batch_means_whatever_the_micro_batch():
    # Two batches of four rows; the metric is the micro-batch's mean of exact binary fractions.
    batches = [{"x": torch.tensor([1.0, 2.0, 3.0, 4.0])}, {"x": torch.tensor([0.5, 0.5, 0.25, 0.75])}]
    want = ((1 + 2 + 3 + 4) / 4 + (0.5 + 0.5 + 0.25 + 0.75) / 4) / 2
    for micro in (1, 2, 4):
        ev = Evaluator(batches, micro, ONE_PROCESS)
        assert ev.run(lambda mb: {"m": mb["x"].mean()})["m"] == want


def test_lr_search_widens_the_grid_until_the_best_is_inside():
    calls = []

    def score(lr):
        calls.append(lr)
        return (math.log10(lr) + 2) ** 2  # best at 1e-2

    r = lr_search(score, [1e-4, 1e-3], factor=10)
    assert r["best"] == pytest.approx(1e-2) and r["inside"]
    assert sorted(calls) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    # A diverged run (nan) is worse than any finite one; a search that cannot get inside says so.
    r = lr_search(lambda lr: float("nan") if lr >= 1 else -lr, [0.25, 0.5], factor=2, max_widen=1)
    assert r["best"] == 0.5 and r["inside"]
    r = lr_search(lambda lr: -lr, [0.25, 0.5], factor=2, max_widen=2)
    assert r["best"] == 2.0 and not r["inside"]


def test_spread_and_paired_bootstrap():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    same = paired_bootstrap([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])  # every difference is 2
    assert same["mean"] == same["lo"] == same["hi"] == 2.0
    mixed = paired_bootstrap([1.0, 0.0, 2.0, 5.0], [0.0, 1.0, 1.0, 1.0])  # differences 1, -1, 1, 4
    assert mixed["lo"] < mixed["mean"] == 1.25 < mixed["hi"] and mixed["lo"] >= -1 and mixed["hi"] <= 4


def test_run_lmforge_reuses_a_finished_run_only_from_the_same_clean_commit(tmp_path, monkeypatch):
    import subprocess

    import lmforge.metrics.runinfo as runinfo
    from lmforge.experiments.harness import run_lmforge

    launched = []

    def fake_run(cmd, stdout, **kwargs):  # an lmforge run that prints its summary line
        launched.append(cmd[3:])
        stdout.write(f'step 1/1 | loss 1.0\n{{"val_loss": {len(launched)}}}\n')
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    git = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(runinfo, "git_info", lambda path=None: dict(git))
    log = tmp_path / "arm" / "lr1e-3.log"
    assert run_lmforge("train", "r.yaml", log=log)[0] == {"val_loss": 1}
    assert run_lmforge("train", "r.yaml", log=log)[0] == {"val_loss": 1} and len(launched) == 1  # reused
    assert run_lmforge("train", "r.yaml", "--optim.lr=2e-3", log=log)[0] == {"val_loss": 2}  # other arguments
    git["commit"] = "b" * 40
    assert run_lmforge("train", "r.yaml", "--optim.lr=2e-3", log=log)[0] == {"val_loss": 3}  # another commit
    git["dirty"] = True
    assert run_lmforge("train", "r.yaml", "--optim.lr=2e-3", log=log)[0] == {"val_loss": 4}  # uncommitted code
    assert launched[-1] == ["train", "r.yaml", "--optim.lr=2e-3"]

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


class Payload:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path, data_dir, capsys):
    r = recipe_file(tmp_path, data_dir, sample_prompts=[], export_hf=False)
    assert main(["train", str(r)]) == 0
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    marker = tmp_path / "pwned"
    for name in ("train_state.pt", "optimizer.pt"):
        torch.save({"state": Payload(marker)}, ckpt / name)
    state = json.loads((ckpt / "state.json").read_text())  # sizes made to match, as an attacker would
    state["files"] = {f: (ckpt / f).stat().st_size for f in state["files"]}
    (ckpt / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", str(r), "--resume", "--train.steps=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0]
    assert not marker.exists()  # refused by weights_only unpickling, never executed
    (tmp_path / "hf").mkdir()
    torch.save({"w": Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    from lmforge.io.hf_config import config_to_hf
    from lmforge.train.recipe import load_recipe

    config = config_to_hf(load_recipe(r).model)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err  # refused by name: safetensors only
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(tmp_path, data_dir):
    """10 runs killed with SIGKILL at seeded random moments (before the first checkpoint, between checkpoints, during
    a checkpoint write, after the end), each resumed with --resume: every one ends with the uninterrupted run's
    per-step losses, each step logged once."""
    import random
    import subprocess
    import sys
    import time

    kw = {"steps": 16, "ckpt_every": 2, "sample_prompts": [], "export_hf": False, "precision": "float32"}
    whole = recipe_file(tmp_path / "whole", data_dir, **kw)
    assert main(["train", str(whole)]) == 0
    want = losses(tmp_path / "whole" / "run")
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(10):
        r = recipe_file(tmp_path / f"t{trial}", data_dir, **kw)
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "train", str(r)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(1.0, 6.0))  # start-up takes a few seconds; training about as long
        proc.kill()
        proc.wait()
        assert main(["train", str(r), "--resume"]) == 0
        assert losses(tmp_path / f"t{trial}" / "run") == want, f"trial {trial}"

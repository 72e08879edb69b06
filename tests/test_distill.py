"""Distillation (lmforge distill): the KL and its gradient, the loss going down, a student equal to its teacher,
stop_kl / plateau / budget, bad recipes, exact resume, and 2 CPU ranks computing what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.objectives import distill as distill_mod
from lmforge.objectives.distill import distill_trainer, kl_from_log_probs, load_distill_recipe, tempered_kl
from lmforge.objectives.lm import lm_loss
from lmforge.train.loop import Trainer
from lmforge.train.recipe import load_recipe

TEACHER = {
    "vocab_size": 300,
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_size": 64,
    "max_seq_len": 64,
    "tie_embeddings": True,
}
# The student: the teacher's width with half its layers (a layer-fused shape), from random init.
STUDENT = {**TEACHER, "num_layers": 1}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_dir) -> Path:
    """A teacher trained for 40 steps on the corpus by `lmforge train`: its HF export (run/final)."""
    out = tmp_path_factory.mktemp("teacher")
    train = {"steps": 40, "batch_size": 8, "seq_len": 32, "eval_every": 0, "eval_batches": 1, "log_every": 40}
    train.update(out_dir=str(out / "run"), sample_prompts=[])
    recipe = {"model": TEACHER, "data": {"path": str(data_dir)}, "optim": {"lr": 1e-2, "warmup_steps": 4}}
    (out / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "train": train}))
    Trainer(load_recipe(out / "recipe.yaml")).run()
    return out / "run" / "final"


def recipe_file(tmp_path: Path, data: Path, teacher: Path | str, *, model=None, distill=None, **train) -> Path:
    t = {
        "steps": 24,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 4,
        "eval_batches": 2,
        "log_every": 1,
        "out_dir": str(tmp_path / "run"),
        "sample_prompts": [],
        **train,
    }
    recipe = {
        "data": {"path": str(data)},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": t,
        "distill": {"teacher": str(teacher), "lm_weight": 0.5, "hidden_mse_weight": 0.1, **(distill or {})},
    }
    if "init_from" not in t:
        recipe["model"] = dict(STUDENT, **(model or {}))
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def trainer(recipe: Path, *overrides: str, resume: bool = False) -> Trainer:
    return distill_trainer(*load_distill_recipe(recipe, list(overrides)), resume=resume)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if r.get("loss") is not None]


def evals(run: Path) -> list[dict]:
    return [r for r in records(run) if "val_kl" in r]


# ---- the KL ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_floats", [1 << 23, 40])  # one chunk; chunks of 3 rows (vocabulary 13)
def test_tempered_kl_and_its_gradient_match_autograd(monkeypatch, chunk_floats):
    monkeypatch.setattr(distill_mod, "KL_CHUNK_FLOATS", chunk_floats)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 13, generator=g, requires_grad=True)
    teacher = 3 * torch.randn(2, 5, 13, generator=g)
    T = 2.0
    ref = T * T * F.kl_div(
        F.log_softmax(student / T, -1).flatten(0, 1), F.log_softmax(teacher / T, -1).flatten(0, 1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref, student)
    got = tempered_kl(student, teacher, T)
    (got_grad,) = torch.autograd.grad(3 * got, student)  # a scaled upstream gradient flows through
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(got_grad, 3 * ref_grad, rtol=1e-5, atol=1e-7)
    kl1 = kl_from_log_probs(student, F.log_softmax(teacher, -1))
    ref1 = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum") / 10
    assert kl1.item() == pytest.approx(ref1.item(), rel=1e-5)


# ---- training runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, data_dir, teacher_dir) -> tuple[dict, Path]:
    """24 steps of KL + LM + hidden MSE with no stop condition: the budget ends it."""
    tmp = tmp_path_factory.mktemp("budget")
    summary = trainer(recipe_file(tmp, data_dir, teacher_dir)).run()
    return summary, tmp / "run"


def test_distillation_loss_decreases_and_budget_ends_the_run(budget_run):
    summary, run = budget_run
    loss = losses(run)
    assert len(loss) == 24 and summary["stopped_by"] == "budget" and summary["steps"] == 24
    assert sum(loss[-4:]) / 4 < 0.7 * sum(loss[:4]) / 4, loss
    ev = evals(run)
    assert [r["step"] for r in ev] == [0, 4, 8, 12, 16, 20, 24]
    assert ev[-1]["val_kl"] < 0.7 * ev[0]["val_kl"], ev
    assert summary["val_kl"] == ev[-1]["val_kl"] and summary["val_kl_start"] == ev[0]["val_kl"]
    # val_ppl is exp(val LM loss); the teacher's own numbers are in the first record and the summary
    assert ev[-1]["val_ppl"] == pytest.approx(torch.tensor(ev[-1]["val_loss"]).exp().item(), rel=1e-6)
    assert ev[0]["teacher_val_ppl"] == pytest.approx(summary["teacher_val_ppl"])
    assert summary["ppl_ratio"] == pytest.approx(summary["val_ppl"] / summary["teacher_val_ppl"])
    assert summary["teacher_flops"] > 0 and summary["student_params"] < summary["teacher_params"]
    assert (run / "final" / "config.json").exists()  # the student, exported as Trainer does
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == summary["teacher"]  # the run folder records the distill section


def test_stop_kl_ends_the_run_at_the_first_evaluation_below_it(tmp_path, data_dir, teacher_dir, budget_run):
    _, run = budget_run
    ev = evals(run)
    target = ev[3]  # same seed and data order: the same trajectory up to the stop
    assert all(r["val_kl"] > target["val_kl"] for r in ev[:3])
    summary = trainer(recipe_file(tmp_path, data_dir, teacher_dir, distill={"stop_kl": target["val_kl"]})).run()
    assert summary["stopped_by"] == "stop_kl" and summary["steps"] == target["step"]
    assert summary["val_kl"] == target["val_kl"]
    assert [r["step"] for r in evals(tmp_path / "run")] == [0, 4, 8, 12]  # the stopping evaluation is not redone


def test_plateau_ends_the_run_after_patience_evaluations_without_gain(tmp_path, data_dir, teacher_dir):
    # Every evaluation must cut the best KL by 90%: none does, so the 2nd evaluation after the start stops it.
    distill = {"plateau_patience": 2, "plateau_min_delta": 0.9}
    summary = trainer(recipe_file(tmp_path, data_dir, teacher_dir, distill=distill)).run()
    assert summary["stopped_by"] == "plateau" and summary["steps"] == 8


def test_student_equal_to_its_teacher_has_zero_kl(tmp_path, data_dir, teacher_dir):
    # train.init_from = the teacher: the same weights, so the KL is 0; stop_kl then ends the run before any step.
    r = recipe_file(tmp_path, data_dir, teacher_dir, init_from=str(teacher_dir), distill={"stop_kl": 1e-6})
    t = trainer(r)
    batch = t.task.next_batch()
    x, y = batch["input_ids"], batch["labels"]
    with torch.no_grad():  # KL and hidden MSE are 0: only the LM term (weight 0.5) is left
        loss, _ = t.objective(t.model, batch)
        assert loss.item() == pytest.approx(0.5 * lm_loss(t.model(x), y).item(), rel=1e-6)
    summary = t.run()
    assert summary["val_kl_start"] < 1e-6 and summary["stopped_by"] == "stop_kl" and summary["steps"] == 0
    assert summary["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_cli_prints_the_summary_as_the_last_line(tmp_path, data_dir, teacher_dir, capsys):
    r = recipe_file(tmp_path, data_dir, teacher_dir, steps=4, eval_every=2)
    assert main(["distill", str(r), "--distill.temperature=1", "--distill.hidden_mse_weight=0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["stopped_by"] == "budget" and summary["steps"] == 4 and "samples" not in summary
    assert lines[-2].startswith("val ppl ") and "stopped by budget" in lines[-2]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["distill"]["temperature"] == 1.0


def test_resume_continues_exactly(tmp_path, data_dir, teacher_dir):
    distill = {"plateau_patience": 50}  # plateau state travels in the checkpoint
    full = recipe_file(tmp_path / "a", data_dir, teacher_dir, steps=8, distill=distill)
    full_t = trainer(full)
    whole = full_t.run()
    cut = recipe_file(tmp_path / "b", data_dir, teacher_dir, steps=8, distill=distill, ckpt_every=4)
    t = trainer(cut)
    t.stop_reason(t.validate())  # what run() does at the start
    for _ in range(4):
        t.train_step()
    t.stop_reason(t.validate())  # what run() does at step 4
    t.save()  # the process "dies" here
    del t
    torch.manual_seed(1234)  # any global RNG state: resume must restore its own
    t = trainer(cut, resume=True)
    (plateau,) = t.stop_rules
    assert plateau.best is not None
    resumed = t.run()
    assert losses(tmp_path / "b" / "run")[-4:] == losses(tmp_path / "a" / "run")[-4:]
    assert resumed["val_kl"] == whole["val_kl"] and resumed["val_loss"] == whole["val_loss"]
    assert plateau.state_dict() == full_t.stop_rules[0].state_dict()
    # another teacher is another run: refused
    assert main(["distill", str(cut), "--resume", "--distill.temperature=3"]) == 2


# ---- bad recipes -----------------------------------------------------------------------------------
NO_LOSS = ("kl_weight", "lm_weight", "hidden_mse_weight")


def bad_recipe_cases(tmp_path: Path, data: Path, teacher: Path):
    return [
        ("vocab_size", recipe_file(tmp_path / "v", data, teacher, model={"vocab_size": 384}), []),
        ("hidden_mse_weight", recipe_file(tmp_path / "h", data, teacher, model={"hidden_size": 48}), []),
        ("distill.tmperature", recipe_file(tmp_path / "k", data, teacher), ["--distill.tmperature=2"]),
        ("distill.nope", recipe_file(tmp_path / "n", data, teacher, distill={"nope": 1}), []),
        ("distill.stop_kl expects float", recipe_file(tmp_path / "t", data, teacher), ["--distill.stop_kl=low"]),
        ("does not exist", recipe_file(tmp_path / "m", data, tmp_path / "missing"), []),
        ("distill.teacher is required", recipe_file(tmp_path / "e", data, ""), []),
        ("eval_every", recipe_file(tmp_path / "s", data, teacher, eval_every=0, distill={"stop_kl": 0.1}), []),
        ("no loss to train", recipe_file(tmp_path / "z", data, teacher, distill=dict.fromkeys(NO_LOSS, 0)), []),
    ]


def test_bad_recipes_are_one_line_errors_and_write_nothing(tmp_path, data_dir, teacher_dir, capsys):
    for needle, recipe, overrides in bad_recipe_cases(tmp_path, data_dir, teacher_dir):
        assert main(["distill", str(recipe), *overrides]) == 2, needle
        err = "".join(x for x in capsys.readouterr().err.splitlines(True) if not x.startswith("lmforge: warning:"))
        assert err.startswith("lmforge: error:") and needle in err and err.count("\n") == 1, (needle, err)
        assert not (recipe.parent / "run").exists(), needle


def test_only_distill_accepts_the_distill_section(tmp_path, data_dir, teacher_dir, capsys):
    assert main(["train", str(recipe_file(tmp_path, data_dir, teacher_dir))]) == 2
    assert "unknown recipe section 'distill'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown recipe section 'growth'"):
        load_distill_recipe(recipe_file(tmp_path, data_dir, teacher_dir), ["--growth.hidden=64"])


# ---- several ranks ---------------------------------------------------------------------------------
def run_cli(recipe: Path, nproc: int) -> None:
    """`lmforge distill` in fresh processes (1 thread each, so no state leaks in from other tests)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "lmforge.cli", "distill", str(recipe)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    errors = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("step "))  # not the log
    assert proc.returncode == 0, errors[-4000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, data_dir, teacher_dir, mode):
    kw = {"steps": 4, "eval_every": 2, "export_hf": False, "precision": "float32"}  # exact: see test_train.py
    run_cli(recipe_file(tmp_path / "one", data_dir, teacher_dir, **kw), 1)
    run_cli(recipe_file(tmp_path / "two", data_dir, teacher_dir, parallel=mode, **kw), 2)
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    kl_a, kl_b = (
        [r["val_kl"] for r in evals(tmp_path / "one" / "run")],
        [r["val_kl"] for r in evals(tmp_path / "two" / "run")],
    )
    assert max(abs(x - y) for x, y in zip(kl_a, kl_b)) <= 1e-5, (kl_a, kl_b)

"""Multi-task training: a branch learns from its own task only, each task's path is an ordinary classifier that
transformers loads with the same logits, loss weightings compute what their formulas say, task sampling follows its
rule, and `lmforge multitask` learns two tasks, resumes exactly and exports each task."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.model.multitask import multitask_from_checkpoint
from lmforge.objectives.multitask import MultiTaskClassification
from lmforge.train.task_mixture import TaskMixture, task_probabilities
from tests.test_finetune import WORDS, checkpoint, rows, separable_task


def topic_task(tmp_path: Path, n: int = 400) -> Path:
    """3 classes: which of three marker words the sentence holds (a second task for the same tokenizer)."""
    rng = random.Random(1)
    marks = ["river", "stone", "cloud"]
    lines = []
    for _ in range(n):
        label = rng.randrange(3)
        words = rng.choices(WORDS[3:], k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), marks[label])
        lines.append(json.dumps({"text": " ".join(words), "label": f"t{label}"}) + "\n")
    path = tmp_path / "topic.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_each_task_path_is_a_plain_classifier_and_a_branch_learns_from_its_own_task_only(tmp_path, family):
    ckpt = checkpoint(tmp_path, family)
    model = multitask_from_checkpoint(str(ckpt), {"a": 2, "b": 3}, 1, 1, "upper", seed=0)
    ids = torch.tensor([[2, 5, 6, 16, 3, 0, 0], [2, 7, 17, 8, 9, 10, 3]])
    mask = (ids != 0).long()
    model.eval()
    for task in (0, 1):
        with torch.no_grad():
            torch.testing.assert_close(model(ids, mask, task=task), model.task_model(task).eval()(ids, mask))
    model.train()
    loss = model(ids, mask, task=0).float().square().sum()
    loss.backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
    assert not any(g for n, g in grads.items() if n.startswith("branches.1."))  # task b's branch: untouched by a
    assert all(g for n, g in grads.items() if n.startswith("branches.0.layers."))
    assert any(g for n, g in grads.items() if n.startswith("trunk.layers.0."))


def test_upper_branches_copy_the_layers_above_the_trunk(tmp_path):
    ckpt = checkpoint(tmp_path, "bert")
    from lmforge.io.checkpoints import load

    original = load(ckpt).state_dict()
    model = multitask_from_checkpoint(str(ckpt), {"a": 2, "b": 2}, 1, 1, "upper", seed=0)
    for b in (0, 1):
        got = model.branches[b].layers[0].state_dict()
        assert all(torch.equal(v, original[f"layers.1.{k}"]) for k, v in got.items())
    fresh = multitask_from_checkpoint(str(ckpt), {"a": 2}, 1, 1, "fresh", seed=5)  # the checkpoint drew seed 0
    assert not torch.equal(fresh.branches[0].layers[0].attn.q_proj.weight, original["layers.1.attn.q_proj.weight"])


def test_loss_weightings_follow_their_formulas():
    logits = torch.tensor([[2.0, 0.0]])
    ce = math.log(1 + math.exp(-2.0))
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([0]), "task": torch.tensor([1])}
    model = lambda ids, mask=None, types=None, task=0: logits  # noqa: E731
    kw = {"names": ["a", "b"], "kinds": ["classification"] * 2, "num_labels": [2, 2], "metrics": ["accuracy"] * 2}
    fixed = MultiTaskClassification(**kw, weighting="fixed", weights=(1.0, 0.25))
    assert fixed(model, batch)[0].item() == pytest.approx(0.25 * ce)
    unc = MultiTaskClassification(**kw, weighting="uncertainty")
    with torch.no_grad():
        unc.log_var[1] = 1.5
    total, metrics = unc(model, batch)
    assert total.item() == pytest.approx(ce * math.exp(-1.5) + 1.5) and metrics["log_var_b"].item() == 1.5
    with torch.no_grad():
        unc.log_var[1] = -3.0  # the formula's total goes negative: nothing clips it
    assert unc(model, batch)[0].item() == pytest.approx(ce * math.exp(3.0) - 3.0, abs=1e-5)  # float32
    ratio = MultiTaskClassification(**kw, weighting="loss_ratio", alpha=1.0)
    assert ratio(model, batch)[0].item() == pytest.approx(ce)  # first loss: ratio 1, the only task seen
    ratio.mean_loss[0], ratio.first_loss[0] = 0.5, 1.0  # task a has halved its loss, task b not at all
    _, m = ratio(model, batch)
    assert m["weight_b"].item() == pytest.approx(1.0 / ((0.5 + 1.0) / 2))


def test_task_sampling_follows_its_rule():
    assert task_probabilities([100, 300], "proportional", 2.0) == pytest.approx([0.25, 0.75])
    assert task_probabilities([100, 400], "temperature", 2.0) == pytest.approx([1 / 3, 2 / 3])  # sqrt sizes
    assert task_probabilities([1, 2], "round_robin", 2.0) is None

    class Stub:
        def __init__(self, n):
            self.encoded, self.tokenizer_files = {"train": [0] * n}, {}

    mix = TaskMixture(["a", "b"], [Stub(100), Stub(300)], "proportional", 1.0, seed=3)
    draws = [mix.task_of(k) for k in range(4000)]
    assert draws == [mix.task_of(k) for k in range(4000)]  # a pure function of (seed, k)
    assert abs(sum(draws) / 4000 - 0.75) < 0.03
    robin = TaskMixture(["a", "b"], [Stub(100), Stub(300)], "round_robin", 1.0, seed=3)
    assert [robin.task_of(k) for k in range(4)] == [0, 1, 0, 1]


def recipe(tmp_path: Path, ckpt: Path, tasks: list[Path], **multitask) -> Path:
    r = {
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "train": {"init_from": str(ckpt), "steps": 160, "batch_size": 16, "seq_len": 16, "eval_every": 80,
                  "log_every": 10, "out_dir": str(tmp_path / "run"), "precision": "float32"},
        "multitask": {"tasks": [str(t) for t in tasks], "trunk_layers": 1, "branch_layers": 1, **multitask},
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "multitask.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_multitask_learns_two_tasks_and_exports_each(tmp_path, capsys):
    ckpt, tasks = checkpoint(tmp_path, "bert"), [separable_task(tmp_path), topic_task(tmp_path)]
    assert main(["multitask", str(recipe(tmp_path, ckpt, tasks))]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val_task_accuracy"] > 0.9 and summary["val_topic_accuracy"] > 0.9, summary
    assert summary["val_score"] == pytest.approx((summary["val_task_accuracy"] + summary["val_topic_accuracy"]) / 2)
    logged = rows(tmp_path / "run")
    assert {"loss_task", "loss_topic"} <= {k for r in logged for k in r}
    # each exported task scores as it did in training, and transformers loads it
    assert main(["eval", str(tmp_path / "run" / "final" / "topic"), "--task", str(tasks[1]), "--seq-len", "16"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["accuracy"] == pytest.approx(summary["val_topic_accuracy"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final" / "task")
    assert hf.config.num_hidden_layers == 2 and hf.config.num_labels == 2


@pytest.mark.parametrize("weighting", ["uncertainty", "loss_ratio"])
def test_multitask_resumes_exactly_with_learned_weights(tmp_path, weighting):
    from lmforge.commands.multitask import load_multitask_recipe, multitask_trainer

    ckpt, tasks = checkpoint(tmp_path, "bert"), [separable_task(tmp_path), topic_task(tmp_path)]
    whole = recipe(tmp_path / "a", ckpt, tasks, weighting=weighting)
    r, extra = load_multitask_recipe(whole, ["--train.steps=40"])
    multitask_trainer(r, extra["multitask"]).run()
    # a run that "dies" after a checkpoint at step 20 and resumes: the same losses after it
    r, extra = load_multitask_recipe(recipe(tmp_path / "b", ckpt, tasks, weighting=weighting),
                                     ["--train.steps=40", "--train.ckpt_every=20"])  # fmt: skip
    t = multitask_trainer(r, extra["multitask"])
    t.validate()
    for _ in range(20):
        t.train_step()
    t.save()
    del t
    multitask_trainer(r, extra["multitask"], resume=True).run()
    a = [x["loss"] for x in rows(tmp_path / "a" / "run") if "loss" in x][-20:]
    b = [x["loss"] for x in rows(tmp_path / "b" / "run") if "loss" in x][-20:]
    assert a == b and len(a) == 20


def test_bad_multitask_inputs_exit_2(tmp_path, capsys):
    ckpt, task = checkpoint(tmp_path, "bert"), separable_task(tmp_path)
    assert main(["multitask", str(recipe(tmp_path, ckpt, [task], trunk_layers=2, branch_layers=1))]) == 2
    assert main(["multitask", str(recipe(tmp_path, ckpt, [task], weighting="gradnorm"))]) == 2
    assert main(["multitask", str(recipe(tmp_path, ckpt, [task], sampling="random"))]) == 2
    assert main(["multitask", str(recipe(tmp_path, ckpt, [task, task]))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("lmforge: error:") for line in err), err


def test_two_ranks_match_one_process(tmp_path):
    """DDP with branches that sit out other tasks' batches (unused parameters), 2 CPU ranks against one process."""
    import os
    import subprocess
    import sys

    ckpt, tasks = checkpoint(tmp_path, "bert"), [separable_task(tmp_path), topic_task(tmp_path)]
    got = {}
    for n in (1, 2):
        r = recipe(tmp_path / f"n{n}", ckpt, tasks, sampling="round_robin")
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"] if n > 1 else []
        cmd = [sys.executable, *launch, "-m", "lmforge.cli", "multitask", str(r), "--train.steps=6",
               "--train.eval_every=3", "--train.export_hf=false"]  # fmt: skip
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[n] = [x["loss"] for x in rows(tmp_path / f"n{n}" / "run") if "loss" in x]
    assert len(got[1]) == 6 and max(abs(a - b) for a, b in zip(got[1], got[2])) <= 1e-5, got

"""Distilling a classifier: the loss terms on hand-checkable tensors, the students `lmforge shrink` makes, and
`lmforge finetune` with a kd section end to end (frozen parameters stay frozen)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.io.checkpoints import load
from lmforge.objectives.classify_kd import (
    LOG_VAR_LIMIT,
    feature_mse,
    soft_target_loss,
    teacher_confidence,
    uncertainty_feature_loss,
)
from lmforge.surgery.shrink import every_other, merge_groups
from tests.test_finetune import checkpoint, recipe, separable_task


def test_soft_target_loss_by_hand():
    same = torch.tensor([[1.0, 2.0, 0.5]])
    assert soft_target_loss(same, same, 2.0) == pytest.approx(0.0, abs=1e-7)
    # teacher uniform over 2 classes, student probabilities (3/4, 1/4) at T = 1: KL = ln 2 - 0.5 ln(16/3)
    student, teacher = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert soft_target_loss(student, teacher, 1.0) == pytest.approx(kl, rel=1e-6)
    # T = 2 divides the logits and multiplies by T^2 = 4: logits (2 ln 3, 0) at T = 2 are (ln 3, 0) at T = 1
    assert soft_target_loss(2 * student, teacher, 2.0) == pytest.approx(4 * kl, rel=1e-6)
    # weights: only the second example counts
    pair = soft_target_loss(
        torch.cat([same[:, :2], student]), torch.cat([same[:, :2], teacher]), 1.0, torch.tensor([0.0, 1.0])
    )
    assert pair == pytest.approx(kl, rel=1e-6)


def test_teacher_confidence_and_the_uncertainty_feature_loss_by_hand():
    conf = teacher_confidence(torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]]))
    assert conf[0] == pytest.approx(0.0, abs=1e-6) and conf[1] == pytest.approx(1.0, abs=1e-6)
    mse = torch.tensor([0.25, 4.0])
    assert uncertainty_feature_loss(mse, torch.zeros(2)) == pytest.approx(0.5 * mse.mean().item())
    # at its optimum s = log(mse) the loss is 0.5 + 0.5 log(mse): the gradient in s vanishes there
    s = torch.log(mse).requires_grad_()
    loss = uncertainty_feature_loss(mse, s)
    loss.backward()
    assert loss.item() == pytest.approx((0.5 + 0.5 * torch.log(mse)).mean().item(), rel=1e-6)
    assert s.grad.abs().max() < 1e-7
    huge = uncertainty_feature_loss(torch.tensor([1e-30]), torch.tensor([-100.0]))  # clamped: finite
    assert huge.item() == pytest.approx(0.5 * math.exp(LOG_VAR_LIMIT) * 1e-30 - 0.5 * LOG_VAR_LIMIT)


def test_feature_mse_ignores_padding():
    a, b = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert feature_mse(a, b, torch.tensor([[1, 1, 0]])).item() == pytest.approx((1 + 9) / 2)


def test_shrink_students(tmp_path):
    cfg, state, _ = load_parts(checkpoint(tmp_path, "bert"))
    cfg4 = cfg.replace(num_layers=4)  # 4 layers, layer k = the 2-layer model's layer k % 2 shifted by k
    state4 = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for k in range(4):
        head = f"layers.{k % 2}."
        state4 |= {f"layers.{k}." + n.removeprefix(head): v + k for n, v in state.items() if n.startswith(head)}
    tgt, out, report = merge_groups(cfg4, state4, group=2)
    assert tgt.num_layers == 2 and report["layer_map"] == [1, 3] and report["groups"] == [[0, 1], [2, 3]]
    assert torch.equal(out["layers.1.attn.q_proj.weight"], state4["layers.2.attn.q_proj.weight"])  # first's attention
    assert torch.equal(out["layers.1.mlp.up_proj.weight"], state4["layers.3.mlp.up_proj.weight"])  # last's FFN
    assert torch.equal(out["layers.0.attn_norm.weight"], state4["layers.0.attn_norm.weight"])
    assert "layers.0.attn.q_proj.weight" in report["frozen"] and not any("mlp" in n for n in report["frozen"])
    tgt, out, report = every_other(cfg4, state4, 2)
    assert report["layer_map"] == [1, 3] and torch.equal(
        out["layers.0.mlp.up_proj.weight"], state4["layers.1.mlp.up_proj.weight"]
    )


def load_parts(path):
    from lmforge.io.checkpoints import read_checkpoint

    cfg, tensors, side = read_checkpoint(path)
    return cfg, dict(tensors), side


def test_finetune_distils_a_shrunk_student_and_keeps_frozen_parameters(tmp_path, capsys):
    ckpt, task = checkpoint(tmp_path, "bert"), separable_task(tmp_path)
    assert main(["finetune", str(recipe(tmp_path / "teacher", ckpt, task))]) == 0
    teacher = tmp_path / "teacher" / "run" / "final"
    assert main(["shrink", str(teacher), "--out", str(tmp_path / "student"), "--group", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = recipe(tmp_path / "kd", tmp_path / "student", task, steps=30)
    text = yaml.safe_load(r.read_text())
    text["kd"] = {"teacher": str(teacher), "feature_weight": 1.0, "uncertainty": "student",
                  "layer_map": report["layer_map"], "freeze": report["freeze_patterns"]}  # fmt: skip
    r.write_text(yaml.safe_dump(text))
    assert main(["finetune", str(r)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["val_accuracy"] > 0.9, summary
    rows = [json.loads(x) for x in (tmp_path / "kd" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"ce", "kd", "feature"} <= set(x) for x in rows if x.get("loss") is not None)
    before, after = load(tmp_path / "student"), load(tmp_path / "kd" / "run" / "final")
    q = "layers.0.attn.q_proj.weight"
    assert torch.equal(before.state_dict()[q], after.state_dict()[q])  # frozen
    assert not torch.equal(
        before.state_dict()["layers.0.mlp.up_proj.weight"], after.state_dict()["layers.0.mlp.up_proj.weight"]
    )


def test_kd_refuses_a_teacher_with_another_vocabulary(tmp_path, capsys):
    bert, llama, task = checkpoint(tmp_path, "bert"), checkpoint(tmp_path, "llama"), separable_task(tmp_path)
    r = recipe(tmp_path / "kd", bert, task, steps=2)
    text = yaml.safe_load(r.read_text()) | {"kd": {"teacher": str(llama)}}
    r.write_text(yaml.safe_dump(text))
    assert main(["finetune", str(r), "--finetune.new_head=true"]) == 2
    assert "tokenizer" in capsys.readouterr().err

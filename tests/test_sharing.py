"""Share, then untie: groups, tying as a pure function, copies kept equal while tied, exact untying and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.io.checkpoints import load
from lmforge.surgery.tie import sharing_groups, tie_state, unique_parameters
from lmforge.train.loop import Trainer
from lmforge.train.recipe import load_recipe_sections
from lmforge.train.sharing import LayerSharing, ShareConfig
from tests.test_train import losses, recipe_file, run_cli


def test_layer_groups():
    assert sharing_groups(6, "all") == [[0, 1, 2, 3, 4, 5]]
    assert sharing_groups(7, "consecutive", 3) == [[0, 1, 2], [3, 4, 5]]  # a lone last layer shares nothing
    assert sharing_groups(6, "cycle", 2) == [[0, 2, 4], [1, 3, 5]]
    assert sharing_groups(6, "none") == []
    for bad in (("pairs", 2), ("cycle", 0), ("consecutive", 7)):
        with pytest.raises(UserError, match="share"):
            sharing_groups(6, *bad)


def test_tie_state_makes_each_group_its_mean_and_counts_units_once():
    torch.manual_seed(0)
    state = {f"layers.{i}.{n}": torch.randn(4, 4) for i in range(4) for n in ("attn.q.weight", "mlp.up.weight")}
    state |= {f"layers.{i}.attn_norm.weight": torch.randn(4) for i in range(4)} | {"embed.weight": torch.randn(8, 4)}
    groups = [[0, 1], [2, 3]]
    tied = tie_state(state, groups, ("attn", "norms"))
    mean = (state["layers.2.attn.q.weight"] + state["layers.3.attn.q.weight"]) / 2
    assert torch.allclose(tied["layers.3.attn.q.weight"], mean) and torch.equal(tied["layers.2.attn.q.weight"], mean)
    assert torch.equal(tied["layers.0.attn_norm.weight"], tied["layers.1.attn_norm.weight"])
    assert torch.equal(tied["layers.1.mlp.up.weight"], state["layers.1.mlp.up.weight"])  # mlp not shared
    assert torch.equal(
        tie_state(state, groups, ("mlp",), "first")["layers.3.mlp.up.weight"], state["layers.2.mlp.up.weight"]
    )
    assert unique_parameters(tied, groups, ("attn", "norms")) == sum(t.numel() for t in state.values()) - 2 * 20


def trainer(tmp: Path, data: Path, share: dict, resume: bool = False, **train) -> Trainer:
    recipe = recipe_file(tmp, data, precision="float32", sample_prompts=[], **train)
    overrides = [f"--share.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in share.items()]
    r, extra = load_recipe_sections(recipe, overrides, {"share": ShareConfig})
    return Trainer(r, resume=resume, share=extra["share"])


def layer_tensors(t: Trainer, i: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.layers[i].parameters()]


def events(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" in r]


def test_copies_stay_equal_while_tied_then_train_apart(tmp_path, data_dir):
    untied = trainer(tmp_path / "u", data_dir, {"groups": "all", "untie_step": 3}, steps=6)
    untied.run()
    tied = trainer(tmp_path / "t", data_dir, {"groups": "all"}, steps=6)
    tied.run()
    (event,) = events(tmp_path / "u" / "run")
    assert event["step"] == 3 and event["reason"] == "steps"
    assert all(torch.equal(a, b) for a, b in zip(layer_tensors(tied, 0), layer_tensors(tied, 1)))
    assert not any(torch.equal(a, b) for a, b in zip(layer_tensors(untied, 0), layer_tensors(untied, 1)))
    # untying changes nothing at the step it happens: the losses agree until the first untied update shows
    a, b = losses(tmp_path / "u" / "run"), losses(tmp_path / "t" / "run")
    assert a[:4] == b[:4] and a[4] != b[4]


def test_updates_after_untying_equal_tied_updates_when_layer_gradients_are_equal(tmp_path, data_dir, monkeypatch):
    """The moments are the shared unit's and on one copy's scale: with every layer's gradient forced equal, untying
    at step 2 changes nothing in the next updates."""
    original = LayerSharing.after_backward

    def equal_gradients(self, model, step):
        for layer in model.layers[1:]:
            for p, p0 in zip(layer.parameters(), model.layers[0].parameters()):
                p.grad.copy_(p0.grad)
        original(self, model, step)

    monkeypatch.setattr(LayerSharing, "after_backward", equal_gradients)
    runs = []
    for name, share in (("untied", {"groups": "all", "untie_step": 2}), ("tied", {"groups": "all"})):
        t = trainer(tmp_path / name, data_dir, share, steps=5)
        for _ in range(5):
            t.train_step()
            t._untie_if_due(None)
        runs.append(t)
    assert not runs[0].sharing.tied and runs[1].sharing.tied
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()))


@pytest.mark.parametrize("cut", [2, 4])  # a checkpoint before the untie (step 3) and after it
def test_resume_across_the_untie_is_exact(tmp_path, data_dir, cut):
    share = {"groups": "cycle", "size": 1, "untie_step": 3, "parts": ["attn", "mlp"]}
    full = trainer(tmp_path / "full", data_dir, share, steps=6)
    full.run()
    t = trainer(tmp_path / "cut", data_dir, share, steps=6)
    for _ in range(cut):
        t.train_step()
        t._untie_if_due(None)
    t.save()
    del t
    trainer(tmp_path / "cut", data_dir, share, resume=True, steps=6).run()
    assert losses(tmp_path / "cut" / "run")[-6 + cut :] == losses(tmp_path / "full" / "run")[-6 + cut :]
    assert [e["step"] for e in events(tmp_path / "cut" / "run")] == [3]


def test_gradient_and_plateau_conditions_untie(tmp_path, data_dir):
    always = {"groups": "all", "grad_corr_below": 1.5, "grad_every": 1, "grad_checks": 2}
    trainer(tmp_path / "g", data_dir, always, steps=5).run()
    (event,) = events(tmp_path / "g" / "run")
    assert event["step"] == 2 and event["reason"] == "gradients" and -1 <= event["grad_corr"] <= 1
    logged = [
        r["grad_corr"]
        for r in map(json.loads, (tmp_path / "g" / "run" / "metrics.jsonl").read_text().splitlines())
        if "grad_corr" in r and "loss" in r
    ]
    assert len(logged) == 2  # checked at steps 1 and 2, then untied
    never = {"groups": "all", "grad_corr_below": -1.5, "grad_every": 1, "grad_checks": 1}
    trainer(tmp_path / "n", data_dir, never, steps=4).run()
    assert events(tmp_path / "n" / "run") == []
    flops = trainer(tmp_path / "f0", data_dir, {"groups": "all"}, steps=1).flops["total"] * 4 * 32  # per step
    trainer(tmp_path / "f", data_dir, {"groups": "all", "untie_flops": 2.5 * flops}, steps=5).run()
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "f" / "run")] == [(3, "flops")]
    plateau = {"groups": "all", "untie_plateau": 1, "plateau_min_delta": 1.0}  # no evaluation gains 100%
    trainer(tmp_path / "p", data_dir, plateau, steps=6, eval_every=2).run()
    assert [(e["step"], e["reason"]) for e in events(tmp_path / "p" / "run")] == [(4, "plateau")]  # best set at step 2


def test_bad_share_sections_are_one_line_errors(tmp_path, data_dir, capsys):
    recipe = recipe_file(tmp_path, data_dir)
    for bad in ("--share.groups=pairs", "--share.parts=[heads]", "--share.untie_fraction=2", "--share.colour=red"):
        assert main(["train", str(recipe), "--share.groups=all", bad]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "share" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_shared_run_exports_one_copy_per_layer_and_two_ranks_match_one(tmp_path, data_dir, mode):
    kw = {"export_hf": True, "sample_prompts": [], "precision": "float32"}
    for name, n, extra in (("one", 1, {}), ("two", 2, {"parallel": mode})):
        recipe = recipe_file(tmp_path / name, data_dir, **kw, **extra)
        text = recipe.read_text() + "share:\n  groups: all\n  untie_step: 3\n"
        recipe.write_text(text)
        run_cli(recipe, n)
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    model = load(tmp_path / "one" / "run" / "final")
    assert len(model.layers) == 2 and not torch.equal(
        model.layers[0].attn.q_proj.weight, model.layers[1].attn.q_proj.weight
    )


def test_tie_command_writes_a_shared_checkpoint_and_reports_its_loss(tmp_path, data_dir, capsys):
    recipe = recipe_file(tmp_path, data_dir, precision="float32", sample_prompts=[])
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    src, dst = tmp_path / "run" / "final", tmp_path / "tied"
    assert main(["tie", str(src), "--out", str(dst), "--data", str(data_dir), "--eval-batches", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["unique_params"] < report["params"] and report["val_loss_after"] > report["val_loss_before"]
    tied = load(dst)
    assert all(torch.equal(a, b) for a, b in zip(tied.layers[0].parameters(), tied.layers[1].parameters()))
    assert main(["tie", str(src), "--out", str(dst)]) == 2  # never overwrites without --overwrite
    assert main(["tie", str(src), "--out", str(tmp_path / "x"), "--groups", "cycle", "--size", "2"]) == 2
    assert not (tmp_path / "x").exists()


def test_the_loss_plot_marks_the_untie(tmp_path, monkeypatch):
    import matplotlib.axes

    from lmforge.metrics.report import plot_curves

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x, **kw: drawn.append((x, kw["label"])))
    rows = [
        {"step": 1, "flops": 1.0, "loss": 5.0},
        {"step": 1, "flops": 1.0, "event": "untie", "reason": "steps"},
        {"step": 2, "flops": 2.0, "val_loss": 4.0},
    ]
    assert plot_curves({"all-10": rows}, tmp_path / "curve.png").exists()
    assert drawn == [(1.0, "all-10: untie")]

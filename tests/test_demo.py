"""`lmforge demo`, the growth experiment, on a tiny corpus with tiny models: the pipeline, its JSON line, the
grown model starting where the source ended, what is counted, and recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.experiments.growth import DEFAULT_RECIPE, analyse, flops_to_reach, load_growth_recipe
from lmforge.surgery.grow import target_config

ROOT = Path(__file__).resolve().parents[1]
JSON_KEYS = (
    "scratch_final_val_loss",
    "grown_flops_to_target",
    "scratch_flops_to_target",
    "saved_pct",
    "saved_pct_with_source",
    "source_final_val_loss",
    "grown_initial_val_loss",
    "seconds",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lmforge.data.tokens import build_dataset

    root = tmp_path_factory.mktemp("demo-data")
    words = ("the", "king", "said", "to", "the", "queen", "that", "the", "sea", "was", "wide", "and", "night", "old")
    g = torch.Generator().manual_seed(0)
    (root / "text").mkdir()
    for d in range(16):
        lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(40)]
        (root / "text" / f"d{d}.txt").write_text(".\n".join(lines))
    build_dataset(root / "data", inputs=[str(root / "text")], tokenizer="bpe:300", val_fraction=0.1, seed=0)
    return root / "data"


def tiny_recipe(tmp_path: Path, data: Path, **growth) -> Path:
    recipe = {
        "model": {"vocab_size": 300, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32,
                  "max_seq_len": 64},
        "data": {"path": str(data)},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 8, "batch_size": 4, "seq_len": 32, "eval_every": 2, "eval_batches": 2, "log_every": 2,
                  "sample_prompts": ["the king"], "sample_tokens": 4},
        "growth": {"hidden": 32, "layers": 2, "source_steps": 6, "source_optim": {"lr": 6e-3},
                   "grown_optim": {"warmup_steps": 1}, "starter_tokenizer": "", **growth},
    }  # fmt: skip
    path = tmp_path / "growth.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_demo_runs_the_growth_experiment(data_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    rc = main(["demo", "--recipe", str(tiny_recipe(tmp_path, data_dir, optimizer_state=True)), "--out", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in JSON_KEYS:
        assert key in result, key
    # The grown model starts where the source ended: growth preserved the function (clone + cancelling noise).
    assert abs(result["grown_initial_val_loss"] - result["source_final_val_loss"]) < 1e-4
    assert result["function_preserved"] is True
    full = json.loads((out / "result.json").read_text())
    assert full["scratch_final_val_loss"] == result["scratch_final_val_loss"]
    # The counts follow from the runs' own metrics: 8 steps of 4 x 32 tokens at each model's FLOPs per token.
    assert full["scratch_flops"] == pytest.approx(8 * 4 * 32 * full["flops_per_token"]["target"])
    assert full["source_flops"] == pytest.approx(6 * 4 * 32 * full["flops_per_token"]["source"])
    assert full["scratch_flops_to_target"] <= full["scratch_flops"]
    if result["grown_flops_to_target"] is None:
        assert result["saved_pct"] is None and result["saved_pct_with_source"] is None
    else:
        saved = 100 * (1 - result["grown_flops_to_target"] / result["scratch_flops_to_target"])
        assert result["saved_pct"] == pytest.approx(saved, abs=0.01)
        with_source = 100 * (1 - (result["grown_flops_to_target"] + full["source_flops"]) / full["scratch_flops_to_target"])  # fmt: skip
        assert result["saved_pct_with_source"] == pytest.approx(with_source, abs=0.01)
    assert full["optimizer_state"] is True
    assert (out / "grown-init" / "optimizer_state.pt").is_file()
    for name in ("report.md", "loss_vs_flops.png", "loss_vs_flops_with_source.png", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert "FLOPs" in (out / "report.md").read_text()
    # The grown and scratch runs trained the same architecture with the same data order.
    grown_cfg = yaml.safe_load((out / "grown" / "config.yaml").read_text())
    scratch_cfg = yaml.safe_load((out / "scratch" / "config.yaml").read_text())
    assert grown_cfg["model"] == scratch_cfg["model"]
    assert grown_cfg["train"]["seed"] == scratch_cfg["train"]["seed"]
    assert grown_cfg["model"]["hidden_size"] == 32 and grown_cfg["model"]["num_layers"] == 2
    # Both target runs at optim.lr; only the grown run's warm-up differs; the source at growth.source_optim's lr.
    source_cfg = yaml.safe_load((out / "source" / "config.yaml").read_text())
    assert grown_cfg["optim"]["lr"] == scratch_cfg["optim"]["lr"] == 3e-3
    assert (grown_cfg["optim"]["warmup_steps"], scratch_cfg["optim"]["warmup_steps"]) == (1, 2)
    assert source_cfg["optim"]["lr"] == 6e-3 and source_cfg["optim"]["warmup_steps"] == 2
    assert "source lr 0.006, warm-up 2 steps, then cosine to 0.1 x lr" in (out / "report.md").read_text()

    # A second run into the same folder needs --overwrite.
    rc = main(["demo", "--recipe", str(tiny_recipe(tmp_path, data_dir)), "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_flops_to_reach_interpolates_and_admits_never():
    curve = [(0.0, 5.0), (10.0, 4.0), (20.0, 3.0), (30.0, 2.5)]
    assert flops_to_reach(curve, 3.5) == pytest.approx(15.0)
    assert flops_to_reach(curve, 3.0) == pytest.approx(20.0)
    assert flops_to_reach(curve, 5.5) == 0.0
    assert flops_to_reach(curve, 2.0) is None


def test_analyse_counts_the_source_only_in_the_second_saving():
    rows = {
        "source": [],
        "grown": [{"step": 0, "flops": 0.0, "val_loss": 3.2}, {"step": 10, "flops": 100.0, "val_loss": 2.8}],
        "scratch": [{"step": 0, "flops": 0.0, "val_loss": 6.0}, {"step": 10, "flops": 400.0, "val_loss": 3.0}],
    }
    summaries = {
        "source": {"flops": 50.0, "val_loss": 3.2, "val_loss_start": 6.0, "params": 1, "steps": 10, "seconds": 1},
        "grown": {"flops": 100.0, "val_loss": 2.8, "val_loss_start": 3.2, "params": 2, "steps": 10, "seconds": 1},
        "scratch": {"flops": 400.0, "val_loss": 3.0, "val_loss_start": 6.0, "params": 2, "steps": 10, "seconds": 1},
    }
    from lmforge.experiments.growth import GrowthConfig

    r = analyse(rows, summaries, GrowthConfig())
    assert r["grown_flops_to_target"] == pytest.approx(50.0)  # 3.2 -> 2.8 crosses 3.0 half way
    assert r["saved_pct"] == pytest.approx(87.5)
    assert r["saved_pct_with_source"] == pytest.approx(75.0)
    summaries["grown"]["val_loss"] = 3.1
    rows["grown"][1]["val_loss"] = 3.1
    r = analyse(rows, summaries, GrowthConfig())
    assert r["grown_flops_to_target"] is None and r["saved_pct"] is None and r["saved_pct_with_source"] is None


@pytest.mark.parametrize("path", [None, "recipes/growth-cpu.yaml", "recipes/growth-gpu.yaml"])
def test_shipped_recipes_load_and_grow(path):
    recipe, growth = load_growth_recipe(None if path is None else ROOT / path)
    sizes = {k: v for k, v in growth.sizes().items() if k != "depth"}
    cfg_t = target_config(recipe.model, **sizes)
    assert cfg_t.hidden_size >= recipe.model.hidden_size and cfg_t.num_layers > recipe.model.num_layers
    assert growth.noise_snr_db is not None and growth.mode == "clone"
    if path is None:
        assert yaml.safe_load(DEFAULT_RECIPE)["growth"]  # the embedded default is a growth recipe too


@pytest.mark.parametrize(
    "override, message",
    [
        ("--growth.hiden=64", "unknown recipe key growth.hiden"),
        ("--growth.layers=four", "growth.layers expects int"),
        ("--growth.grown_optim={warmup: 3}", "growth.grown_optim: unknown recipe key optim.warmup"),
        ("--growth.source_optim={lr: fast}", "growth.source_optim: recipe key optim.lr expects float"),
        ("--train.stepz=3", "unknown recipe key train.stepz"),
        ("--growth.hidden=8", "smaller than the source"),
        ("--growth.mode=copy", "growth mode 'copy'"),
        ("--model.vocab_size=100", "larger than the model's vocab_size"),
    ],
)
def test_recipe_mistakes_are_one_line_errors_and_write_nothing(data_dir, tmp_path, capsys, override, message):
    out = tmp_path / "never"
    rc = main(["demo", "--recipe", str(tiny_recipe(tmp_path, data_dir)), "--out", str(out), override])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_unknown_section_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("growht:\n  hidden: 64\n")
    with pytest.raises(UserError, match="unknown recipe section 'growht'"):
        load_growth_recipe(bad)

"""The training loop: exact resume, and 2 CPU ranks (gloo) computing what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.train import loop
from lmforge.train.loop import Trainer
from lmforge.train.optim import lr_factor
from lmforge.train.recipe import load_recipe


def recipe_file(tmp_path: Path, data: Path, **train) -> Path:
    model = {
        "vocab_size": 300,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_size": 64,
        "max_seq_len": 64,
        "tie_embeddings": True,
    }
    t = {
        "steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 3,
        "eval_batches": 2,
        "log_every": 1,
        "out_dir": str(tmp_path / "run"),
        "sample_prompts": ["the king"],
        "sample_tokens": 8,
        **train,
    }
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "recipe.yaml"
    p.write_text(
        yaml.safe_dump(
            {"model": model, "data": {"path": str(data)}, "optim": {"lr": 1e-2, "warmup_steps": 2}, "train": t}
        )
    )
    return p


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("loss") is not None]


def test_lr_schedule_warms_up_then_decays():
    oc = load_recipe(None, ["--optim.warmup_steps=10", "--optim.min_lr_ratio=0.1"]).optim
    f = [lr_factor(s, oc, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] == pytest.approx(0.1, abs=1e-3)


def test_train_end_to_end_writes_run_folder(tmp_path, data_dir, capsys):
    assert main(["train", str(recipe_file(tmp_path, data_dir))]) == 0
    run = tmp_path / "run"
    for f in ("metrics.jsonl", "config.yaml", "run.json", "final/config.json", "final/model.safetensors"):
        assert (run / f).exists(), f
    assert len(losses(run)) == 6
    out = capsys.readouterr().out
    assert "val loss" in out and "parameters on cpu" in out and "(train.precision auto)" in out


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_dir):
    full = recipe_file(tmp_path / "a", data_dir)
    Trainer(load_recipe(full)).run()
    cut = recipe_file(tmp_path / "b", data_dir, ckpt_every=3)
    t = Trainer(load_recipe(cut))
    for _ in range(3):
        t.train_step()
    t.save()  # the process "dies" here
    del t
    torch.manual_seed(1234)  # any global RNG state: resume must restore its own
    Trainer(load_recipe(cut), resume=True).run()
    assert losses(tmp_path / "b" / "run")[-3:] == losses(tmp_path / "a" / "run")[-3:]


def test_precision_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively_and_the_model_is_wide(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda native=native: native)
        assert loop.precision("auto", cpu, 256) == (torch.bfloat16 if native else torch.float32)
        assert loop.precision("auto", cpu, 128) == torch.float32  # too narrow for bf16 to pay on a CPU
        assert loop.precision("float32", cpu) == torch.float32 and loop.precision("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="train.precision"):
        loop.precision("fp16", cpu)


def test_bf16_autocast_keeps_float32_weights_state_and_loss_and_tracks_float32(tmp_path, data_dir):
    runs = {}
    for name in ("float32", "bfloat16"):
        t = Trainer(load_recipe(recipe_file(tmp_path / name, data_dir, precision=name, sample_prompts=[])))
        runs[name] = [t.train_step()[0] for _ in range(4)]
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
        moments = [v for state in t.optimizer.state.values() for v in state.values() if v.dim()]
        assert moments and all(v.dtype == torch.float32 for v in moments)
        batch = t.task.next_batch()
        with t.autocast():
            loss, _ = t.objective(t.wrapped, batch)
            logits = t.wrapped(batch["input_ids"])
        assert loss.dtype == torch.float32 and logits.dtype == getattr(torch, name)
    # the same start and batches: bf16 rounding moves the losses a little, not the run
    assert runs["float32"] != runs["bfloat16"]
    assert max(abs(a - b) for a, b in zip(runs["float32"], runs["bfloat16"])) < 0.05, runs


def test_resume_refuses_another_config(tmp_path, data_dir, capsys):
    r = recipe_file(tmp_path, data_dir)
    assert main(["train", str(r)]) == 0
    assert main(["train", str(r), "--resume", "--model.hidden_size=64"]) == 2
    assert "hidden_size" in capsys.readouterr().err
    assert main(["train", str(r)]) == 2  # without --resume the existing run is never overwritten


def run_cli(recipe: Path, nproc: int) -> None:
    """`lmforge train` in fresh processes (1 thread each, so no state leaks in from other tests)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "lmforge.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, data_dir, mode):
    # float32: under bf16 autocast each rank's smaller matmuls round differently from the one process's
    kw = {"export_hf": False, "sample_prompts": [], "precision": "float32"}
    one = recipe_file(tmp_path / "one", data_dir, **kw)
    two = recipe_file(tmp_path / "two", data_dir, parallel=mode, **kw)
    run_cli(one, 1)
    run_cli(two, 2)
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


def test_resume_before_the_first_checkpoint_starts_over_and_logs_each_step_once(tmp_path, data_dir, capsys):
    full = recipe_file(tmp_path / "a", data_dir)
    Trainer(load_recipe(full)).run()
    dead = recipe_file(tmp_path / "b", data_dir, ckpt_every=3)
    t = Trainer(load_recipe(dead))
    t.log.log_eval(0, 0, 0.0, val_loss=9.9)  # what a run killed before its first checkpoint leaves behind
    t.log.close()
    del t
    Trainer(load_recipe(dead), resume=True).run()
    assert "starting the run from the beginning" in capsys.readouterr().out
    a, b = (rows_of(tmp_path / x / "run") for x in ("a", "b"))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "mem")} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)  # every step once, the same numbers as the uninterrupted run


def rows_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_model_exports_the_datas_end_of_text_and_covers_its_training_length(tmp_path, data_dir, capsys):
    assert main(["train", str(recipe_file(tmp_path, data_dir, steps=2, sample_prompts=[]))]) == 0
    manifest = json.loads((data_dir / "manifest.json").read_text())
    exported = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert exported["eos_token_id"] == manifest["eos_id"] is not None
    capsys.readouterr()
    too_long = recipe_file(tmp_path / "long", data_dir, seq_len=128)  # the test model's max_seq_len is 64
    assert main(["train", str(too_long)]) == 2
    assert "raise model.max_seq_len" in capsys.readouterr().err
    # a RoPE checkpoint trained longer than it declared: the new run declares the length it was trained at
    longer = tmp_path / "longer" / "recipe.yaml"
    longer.parent.mkdir()
    longer.write_text(f"train: {{init_from: {tmp_path / 'run' / 'final'}, seq_len: 128, steps: 1, batch_size: 2, "
                      f"eval_batches: 1, sample_prompts: [], out_dir: {longer.parent / 'run'}}}\ndata: {{path: {data_dir}}}\n")  # fmt: skip
    assert main(["train", str(longer)]) == 0
    assert "the trained model declares 128" in capsys.readouterr().err
    assert json.loads((longer.parent / "run" / "final" / "config.json").read_text())["max_position_embeddings"] == 128


def test_a_run_folder_resumes_as_it_was_wherever_it_moved(tmp_path, data_dir, capsys):
    """`lmforge train RUN --resume` takes the run's own config (the overrides it was started with need no retyping),
    accepts a longer budget, refuses a shorter one without touching the run, and says where it resumes."""
    r = recipe_file(tmp_path / "a", data_dir, ckpt_every=3, sample_prompts=[])
    assert main(["train", str(r), "--optim.lr=2e-3"]) == 0  # 6 steps with an override
    moved = tmp_path / "moved"
    (tmp_path / "a" / "run").rename(moved)
    config_before, before = (moved / "config.yaml").read_text(), losses(moved)
    capsys.readouterr()
    assert main(["train", str(moved), "--resume", "--train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "reached step 6, beyond train.steps 4" in err.splitlines()[-1] and "Traceback" not in err
    assert (moved / "config.yaml").read_text() == config_before  # the refused resume changed nothing
    assert main(["train", str(moved), "--resume", "--optim.lr=1e-3", "--train.steps=9"]) == 2
    assert "optim.lr is 0.002 there and 0.001 now" in capsys.readouterr().err
    assert main(["train", str(moved), "--resume", "--train.steps=9"]) == 0
    assert "resuming " + str(moved) + " at step 6 of 9" in capsys.readouterr().out
    after = losses(moved)
    assert len(after) == 9 and after[:6] == before  # the schedule now spans 9 steps: a longer run, not the same
    assert "| steps | 9 (stopped by budget) |" in (moved / "report.md").read_text()  # every run: report and plot
    assert (moved / "loss.png").stat().st_size > 0
    assert main(["train", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err

import json
import random
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from lmforge.errors import UserError
from lmforge.metrics.runinfo import git_info, write_run_info
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.objectives.lm import lm_loss
from lmforge.train import checkpoint
from lmforge.train.checkpoint import find_latest, load_checkpoint, rng_state, save_checkpoint, set_rng_state

CFG = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_size=64,
    max_seq_len=32,
    tie_embeddings=True,
)
RUN_CONFIG = {"model": CFG.to_dict(), "train": {"lr": 3e-3, "batch_size": 4, "seq_len": 16, "steps": 6}}


def make_run(seed: int):
    torch.manual_seed(seed)
    model = Transformer(CFG)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def train_step(model, opt, sched, sampler):
    # The batch depends on torch's, NumPy's and Python's generators, so all three must be restored.
    ids = torch.randint(CFG.vocab_size, (4, 17))
    ids = (ids + int(np.random.randint(CFG.vocab_size)) + random.randrange(CFG.vocab_size)) % CFG.vocab_size
    loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    sampler["pos"] += 4
    return loss.item()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save(run_dir, step, model, opt, sched, sampler, keep_last=0, config=RUN_CONFIG):
    return save_checkpoint(
        run_dir,
        step,
        model.state_dict(),
        opt.state_dict(),
        sched.state_dict(),
        dict(sampler),
        rng_state(),
        config,
        keep_last=keep_last,
        extra={"tokens": step * 64},
    )


def test_rng_state_round_trip():
    seed_all(3)
    state = rng_state()
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    seed_all(99)
    set_rng_state(state)
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert draws[:3] == again[:3] and torch.equal(draws[3], again[3])


def test_resume_gives_identical_losses(tmp_path):
    seed_all(0)
    model, opt, sched = make_run(0)
    sampler = {"pos": 0}
    straight = [train_step(model, opt, sched, sampler) for _ in range(6)]
    final_straight = {k: v.clone() for k, v in model.state_dict().items()}

    seed_all(0)
    model, opt, sched = make_run(0)
    sampler = {"pos": 0}
    first = [train_step(model, opt, sched, sampler) for _ in range(3)]
    ckpt = save(tmp_path, 3, model, opt, sched, sampler)
    del model, opt, sched

    seed_all(1234)  # a new process: other weights, other generator states
    model, opt, sched = make_run(1)
    state = load_checkpoint(tmp_path, expected_config=RUN_CONFIG)
    assert state["path"] == ckpt and state["step"] == 3 and state["extra"] == {"tokens": 192}
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    sampler = state["sampler"]
    assert sampler == {"pos": 12}
    rest = [train_step(model, opt, sched, sampler) for _ in range(3)]

    assert first + rest == straight  # bit-identical, not approximately equal
    for k, v in model.state_dict().items():
        assert torch.equal(v, final_straight[k]), k
    assert model.lm_head.weight is model.embed.tok.weight  # loading kept the tie


def test_tied_weights_are_stored_once(tmp_path):
    model, opt, sched = make_run(0)
    ckpt = save(tmp_path, 1, model, opt, sched, {"pos": 0})
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed.tok.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((ckpt / "state.json").read_text())["aliases"] == {"lm_head.weight": "embed.tok.weight"}
    loaded = load_checkpoint(ckpt)["model"]
    assert loaded["lm_head.weight"] is loaded["embed.tok.weight"]
    assert set(loaded) == set(model.state_dict())
    for f in ("optimizer.pt", "train_state.pt"):  # plain containers: the safe loader reads them
        torch.load(ckpt / f, weights_only=True)


def test_keep_last_and_latest_pointer(tmp_path):
    model, opt, sched = make_run(0)
    for step in range(1, 6):
        save(tmp_path, step * 10, model, opt, sched, {"pos": step}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000040", "step_000050"]
    assert (root / "latest").read_text() == "step_000050\n"
    assert find_latest(tmp_path) == root / "step_000050"
    assert load_checkpoint(tmp_path, load_optimizer=False)["optimizer"] is None


def test_failed_save_leaves_previous_checkpoint_and_latest(tmp_path, monkeypatch):
    model, opt, sched = make_run(0)
    save(tmp_path, 1, model, opt, sched, {"pos": 1}, keep_last=1)
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the file is written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, opt, sched, {"pos": 2}, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # no step_000002, no temp folder
    assert (root / "latest").read_text() == "step_000001\n"
    assert load_checkpoint(tmp_path)["sampler"] == {"pos": 1}


def test_unloadable_state_is_refused_at_save_time(tmp_path):
    model, opt, sched = make_run(0)
    with pytest.raises(TypeError, match=r"train_state\['sampler'\]\['pos'\] is a int64"):
        save(tmp_path, 1, model, opt, sched, {"pos": np.int64(3)})
    assert not (tmp_path / "checkpoints").exists()


def test_config_mismatch_names_the_first_differing_key(tmp_path):
    model, opt, sched = make_run(0)
    save(tmp_path, 1, model, opt, sched, {"pos": 0})
    changed = {"model": {**CFG.to_dict(), "hidden_size": 64}, "train": {**RUN_CONFIG["train"], "lr": 1e-3}}
    with pytest.raises(UserError, match=r"model\.hidden_size is 32 there and 64 now"):
        load_checkpoint(tmp_path, expected_config=changed)
    longer = {"model": CFG.to_dict(), "train": {**RUN_CONFIG["train"], "steps": 100}}
    with pytest.raises(UserError, match=r"train\.steps"):
        load_checkpoint(tmp_path, expected_config=longer)
    assert load_checkpoint(tmp_path, expected_config=longer, ignore=("train.steps",))["step"] == 1
    extra_key = {**RUN_CONFIG, "data": {"path": "x"}}
    with pytest.raises(UserError, match=r"data\.path is absent there"):
        load_checkpoint(tmp_path, expected_config=extra_key)


def test_missing_or_corrupt_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    model, opt, sched = make_run(0)
    ckpt = save(tmp_path, 1, model, opt, sched, {"pos": 0})

    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=re.escape(f"checkpoint {ckpt} is corrupt: model.safetensors")):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\xff" * len(data))  # right size, garbage inside
    with pytest.raises(UserError, match="is corrupt: cannot read model.safetensors"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)

    opt_bytes = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(b"\0" * len(opt_bytes))
    with pytest.raises(UserError, match="is corrupt: cannot read optimizer.pt"):
        load_checkpoint(ckpt)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="optimizer.pt is missing"):
        load_checkpoint(ckpt)

    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read state.json"):
        load_checkpoint(ckpt)
    (ckpt / "state.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not an lmforge training checkpoint"):
        load_checkpoint(ckpt)


def test_latest_pointer_to_missing_folder_falls_back_to_highest_step(tmp_path):
    model, opt, sched = make_run(0)
    save(tmp_path, 5, model, opt, sched, {"pos": 0})
    save(tmp_path, 7, model, opt, sched, {"pos": 0})
    (tmp_path / "checkpoints" / "latest").write_text("step_000099\n")
    assert find_latest(tmp_path) == tmp_path / "checkpoints" / "step_000007"
    assert checkpoint.resolve_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_000007"


def test_write_run_info(tmp_path):
    cfg = {"model": CFG.to_dict(), "train": {"seq_len": (16, 32), "out_dir": tmp_path}}
    info = write_run_info(tmp_path, cfg, seed=7, argv=["lmforge", "train", "r.yaml"])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seq_len"] == [16, 32]
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk == info
    assert info["seed"] == 7 and info["command"] == "lmforge train r.yaml"
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["versions"]["safetensors"] and info["versions"]["python"]
    assert info["hostname"] and info["device"] and info["start_time"]
    assert "git_commit" in info and "git_dirty" in info

    again = write_run_info(tmp_path, cfg, seed=7, argv=["lmforge", "train", "r.yaml", "--resume"])
    assert again["start_time"] == info["start_time"] and again["command"] == info["command"]
    assert [r["command"] for r in again["resumes"]] == ["lmforge train r.yaml --resume"]


def test_git_info_outside_a_repository(tmp_path):
    assert git_info(tmp_path) == {"commit": None, "dirty": None}
    here = git_info()  # lmforge's own checkout (tests run from the repository)
    if here["commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", here["commit"]) and isinstance(here["dirty"], bool)

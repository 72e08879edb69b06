"""Training checkpoints: save atomically, find the latest, resume exactly (model, optimizer, data position, RNG).

Layout of one checkpoint, run_dir/checkpoints/step_000120/:

    model.safetensors  the model state; a tensor shared by several names (tied embedding / LM head)
                       is stored once and the other names are recorded as aliases
    optimizer.pt       the optimizer state dict           } tensors and plain Python containers only,
    train_state.pt     scheduler, sampler and RNG states  } so torch.load(weights_only=True) reads them
    state.json         step, time, the run's config, caller's `extra` counters, aliases, file sizes

run_dir/checkpoints/latest holds the name of the newest complete checkpoint. Every write goes to a
temporary folder renamed into place, then `latest` is replaced, then old checkpoints are pruned: a
crash at any point leaves the previous checkpoint and `latest` intact.

Distributed training: only rank 0 calls save_checkpoint, with full (unsharded) state dicts on CPU.
DDP: `model.module.state_dict()` and `optimizer.state_dict()`. FSDP2: from
torch.distributed.checkpoint.state_dict, get_model_state_dict / get_optimizer_state_dict with
StateDictOptions(full_state_dict=True, cpu_offload=True), which every rank must call (they gather)
before rank 0 saves. To resume, every rank calls load_checkpoint (or rank 0 does and
set_model_state_dict / set_optimizer_state_dict broadcast with broadcast_from_rank0=True).
rng_state() is the calling rank's generators; save one per rank (e.g. gathered into a list in
`sampler_state` or `extra`) if the ranks' streams differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.io.atomic import atomic_dir, atomic_write_bytes

FORMAT = "lmforge.checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE, STATE_FILE = (
    "model.safetensors",
    "optimizer.pt",
    "train_state.pt",
    "state.json",
)


# ---- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python `random`, NumPy's global, torch CPU and (if present) every CUDA generator's state, as
    tensors and plain containers (so a weights_only torch.load reads them back)."""
    np_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured. CUDA states are restored for the devices present."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---- helpers --------------------------------------------------------------------------------------
_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Fail at save time, not at resume, on anything torch.load(weights_only=True) would refuse."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, int | str):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}, not str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(
            f"checkpoint {where} is a {type(obj).__name__}: only tensors, numbers, strings and "
            "lists / tuples / dicts of them can be loaded with weights_only=True"
        )


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write (CPU, contiguous, no shared storage) and {alias: stored name}.

    Names that are the very same tensor (tied weights) are stored once; a tensor that only overlaps
    another's storage (a view) is copied."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}  # identity of a view -> first name
    storages: set[int] = set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if ptr is not None and ident in seen:
            aliases[name] = seen[ident]
            continue
        if ptr is not None:
            seen[ident] = name
        shared = ptr is not None and ptr in storages
        if ptr is not None:
            storages.add(ptr)
        t = t.to("cpu")
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    return out, aliases


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with state.json) under run_dir/checkpoints, sorted by step."""
    if not ckpt_root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in ckpt_root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return sorted(found)


def _ckpt_root(run_dir: Path) -> Path:
    return run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"


# ---- save -----------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    scheduler_state: dict | None,
    sampler_state: dict | None,
    rng_state: dict | None,
    config: dict,
    keep_last: int = 0,
    extra: dict | None = None,
    objective_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write run_dir/checkpoints/step_{step:06d}/ atomically, point `latest` at it, then keep only the
    newest `keep_last` checkpoints (0: keep all). `config` (the resolved run config, JSON-able) is
    checked against the current one on resume; `extra` holds JSON-able counters (tokens, flops...);
    `objective_state` the tensors an objective learns besides the model (kept in train_state.pt).
    Returns the checkpoint folder. Call on rank 0 only."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    train_state = {"scheduler": scheduler_state, "sampler": sampler_state, "rng": rng_state}
    if objective_state:
        train_state["objective"] = objective_state
    _check_plain(optimizer_state, "optimizer_state")
    _check_plain(train_state, "train_state")
    tensors, aliases = _dedup(model_state)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "extra": extra or {},
        "aliases": aliases,
    }
    try:
        json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"checkpoint config / extra must be JSON-serialisable: {e}") from None

    root = _ckpt_root(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # leftovers of a save that was killed (atomic_dir's temp names)
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:06d}"
    with atomic_dir(root / name, overwrite=True) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
        meta["files"] = {f: (tmp / f).stat().st_size for f in (MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE)}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence marks completion
        for f in (*meta["files"], STATE_FILE):
            _fsync(tmp / f)  # the data is on disk before the rename makes it visible
    with contextlib.suppress(OSError):
        _fsync(root)  # the rename itself
    atomic_write_bytes(root / "latest", f"{name}\n".encode())

    if keep_last > 0:
        # Prune only checkpoints older than this one: a later step left by an abandoned run (resumed
        # from an earlier checkpoint) is not ours to judge.
        older = [p for s, p in _step_dirs(root) if s < step]
        for p in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return root / name


# ---- find and load --------------------------------------------------------------------------------
def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (what `latest` names, else the highest step), or None."""
    root = _ckpt_root(Path(run_dir))
    with contextlib.suppress(OSError):
        name = (root / "latest").read_text().strip()
        if STEP_DIR.match(name) and (root / name / STATE_FILE).is_file():
            return root / name
    found = _step_dirs(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest checkpoint of a run folder; UserError if neither."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    found = find_latest(path)
    if found is None:
        raise UserError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*/state.json)")
    return found


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_config(saved: dict, current: dict, ignore: tuple[str, ...] = (), where: str = "checkpoint") -> None:
    """UserError naming the first dotted key whose value differs between two configs; keys equal to
    or under one of `ignore` (e.g. "train.max_steps", "eval") may differ."""
    # Compare through JSON so tuples and lists, 1e-3 and 0.001, read the same.
    a = _flatten(json.loads(json.dumps(saved)))
    b = _flatten(json.loads(json.dumps(current)))
    missing = object()
    for key in list(b) + [k for k in a if k not in b]:
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        was, now = a.get(key, missing), b.get(key, missing)
        if was != now:
            was_s = "absent" if was is missing else json.dumps(was)
            now_s = "absent" if now is missing else json.dumps(now)
            raise UserError(
                f"{where} was made with a different config: {key} is {was_s} there and {now_s} now "
                "(use matching settings or a new run folder)"
            )


def _read_state_json(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} is corrupt: cannot read {STATE_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"checkpoint {ckpt} is not an lmforge training checkpoint ({STATE_FILE} has no format {FORMAT!r})"
        )
    if meta.get("version") != VERSION:
        raise UserError(f"checkpoint {ckpt} has format version {meta.get('version')}, this lmforge reads {VERSION}")
    return meta


def load_checkpoint(
    path: str | os.PathLike,
    expected_config: dict | None = None,
    ignore: tuple[str, ...] = (),
    load_optimizer: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint folder, or a run folder's latest one, onto the CPU.

    Returns {"path", "step", "config", "extra", "model" (state dict, tied names restored as one
    tensor), "optimizer", "scheduler", "sampler", "rng", "objective" (None if it learned nothing)}; "optimizer" is
    None without load_optimizer.
    With expected_config, a saved config that differs (outside `ignore`) is a UserError naming the key."""
    ckpt = resolve_checkpoint(path)
    meta = _read_state_json(ckpt)
    if expected_config is not None:
        check_config(meta.get("config", {}), expected_config, ignore, where=f"checkpoint {ckpt}")
    for f, size in meta.get("files", {}).items():
        if not (ckpt / f).is_file():
            raise UserError(f"checkpoint {ckpt} is incomplete: {f} is missing")
        if (ckpt / f).stat().st_size != size:
            raise UserError(
                f"checkpoint {ckpt} is corrupt: {f} has {(ckpt / f).stat().st_size} bytes, {size} were written"
            )

    def read(f: str, reader):
        try:
            return reader(ckpt / f)
        except FileNotFoundError:
            raise UserError(f"checkpoint {ckpt} is incomplete: {f} is missing") from None
        except Exception as e:  # safetensors, zip and unpickling errors all mean a damaged file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"checkpoint {ckpt} is corrupt: cannot read {f}: {first}") from None

    model = read(MODEL_FILE, lambda p: load_file(str(p)))
    for alias, target in meta.get("aliases", {}).items():
        if target not in model:
            raise UserError(f"checkpoint {ckpt} is corrupt: alias {alias} -> {target}, which is not stored")
        model[alias] = model[target]
    optimizer = (
        read(OPTIMIZER_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True)) if load_optimizer else None
    )
    train_state = read(TRAIN_STATE_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    if not isinstance(train_state, dict):
        raise UserError(f"checkpoint {ckpt} is corrupt: {TRAIN_STATE_FILE} does not hold a dict")
    return {
        "path": ckpt,
        "step": meta["step"],
        "config": meta.get("config", {}),
        "extra": meta.get("extra", {}),
        "model": model,
        "optimizer": optimizer,
        "scheduler": train_state.get("scheduler"),
        "sampler": train_state.get("sampler"),
        "rng": train_state.get("rng"),
        "objective": train_state.get("objective"),
    }

"""What a run folder records about how it was made: the resolved config and the run's provenance.

run_dir/config.yaml  the fully resolved config (every default filled in): rerunnable as it is
run_dir/run.json     git commit (+ dirty flag), library versions, host, device, seed, command line,
                     start time; each resume of the same folder appends its own entry to "resumes"
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.io.atomic import atomic_write_bytes

LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "tokenizers", "lmforge")


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the git checkout holding `path` (default:
    lmforge's own source). None when git is missing or `path` is not in a repository."""
    path = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")  # untracked files do not change the code run
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def library_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed), read from package metadata without importing them."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda  # the CUDA torch was built with; None for a CPU build
    return versions


def device_description() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _plain(config: dict) -> dict:
    """JSON's view of the config (tuples -> lists, paths -> str), which YAML's safe dumper accepts."""
    return json.loads(json.dumps(config, default=str))


def write_run_info(
    run_dir: str | os.PathLike, resolved_config: dict, seed: int, argv: list[str] | None = None
) -> dict[str, Any]:
    """Write run_dir/config.yaml and run_dir/run.json (atomically) and return run.json's content.

    A second call on the same folder (a resume) keeps the first start's record and appends this one
    to its "resumes" list; config.yaml is rewritten with the config now in force. Call on rank 0."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _plain(resolved_config)
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())

    this = {
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{f"git_{k}": v for k, v in git_info().items()},
        "command": shlex.join(sys.argv if argv is None else argv),
        "hostname": socket.gethostname(),
        "device": device_description(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "seed": seed,
        "versions": library_versions(),
    }
    info = this
    path = run_dir / "run.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None  # unreadable: start the record afresh
        if isinstance(previous, dict):
            info = {**previous, "resumes": [*previous.get("resumes", []), this]}
    atomic_write_bytes(path, (json.dumps(info, indent=2) + "\n").encode())
    return info

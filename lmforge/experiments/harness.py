"""The protocol every benchmark follows, so that its numbers survive a sceptical reviewer.

1. Tune on validation only: each arm gets its own learning-rate search (`lr_search`); the grid is widened by a
   factor until the best value lies strictly inside it, so no arm wins because its baseline sat at a grid edge.
2. Claim on test: the tuned arms are run again over several seeds, on seeds the search never used, and the claim is
   read from the test split, which nothing in step 1 read.
3. Uncertainty: every number is reported with its mean, spread and range over seeds (`spread`), and every
   comparison as the mean of the per-seed paired differences with a paired bootstrap interval (`paired_bootstrap`).
4. Cost: every stage (the source's training, surgery, calibration, a teacher's passes, each run) is charged in FLOPs
   where they can be counted and in seconds always (`Stages`); the headline counts all of them.
5. Provenance: the result.json of every run carries the date, machine, torch version, commit and exact command
   (`provenance`), and is committed beside the numbers quoted from it.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (n - 1), min, max and n of per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """The mean of the paired differences a_i - b_i (one pair per seed) and its percentile bootstrap interval at
    `level`: seeds are resampled with replacement, the mean difference recomputed each time. With 3 seeds the interval
    can only be as wide as the differences themselves: it says how consistent the sign is, not more."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no pairs to compare")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "level": level, "n": int(d.size)}


def lr_search(
    score: Callable[[float], float], grid: Sequence[float], factor: float = 2.0, max_widen: int = 4
) -> dict[str, Any]:
    """Learning-rate search on a validation score (lower is better): every lr of `grid` is scored, and while the best
    one is the smallest (largest) tried, the grid is extended below (above) by `factor`, at most max_widen times.
    Returns {"scores": {lr: score}, "best": lr, "inside": whether the best has a tried neighbour on both sides}.
    A non-finite score (a diverged run) counts as worse than any finite one."""
    scores: dict[float, float] = {}

    def key(lr: float) -> float:
        s = scores[lr]
        return s if math.isfinite(s) else math.inf

    for lr in sorted(grid):
        scores[lr] = score(lr)
    for _ in range(max_widen):
        tried = sorted(scores)
        best = min(tried, key=key)
        if best == tried[0]:
            new = tried[0] / factor
        elif best == tried[-1]:
            new = tried[-1] * factor
        else:
            break
        scores[new] = score(new)
    tried = sorted(scores)
    best = min(tried, key=key)
    return {"scores": {f"{lr:g}": scores[lr] for lr in tried}, "best": best, "inside": tried[0] < best < tried[-1]}


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """Training FLOPs at which a curve [(flops, loss)] first reaches `target`, interpolated linearly between the
    evaluation before and the first one at or below it; None if it never does."""
    for i, (f, v) in enumerate(points):
        if v <= target:
            if i == 0:
                return float(f)
            f0, v0 = points[i - 1]
            return float(f0 + (v0 - target) / (v0 - v) * (f - f0))
    return None


class Stages:
    """Wall time and FLOPs charged to each named stage of an experiment: `with stages.timed("surgery"):`."""

    def __init__(self):
        self.records: dict[str, dict[str, float | None]] = {}

    @contextmanager
    def timed(self, name: str, flops: float | None = None):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, flops)

    def add(self, name: str, seconds: float, flops: float | None = None) -> None:
        self.records[name] = {"seconds": round(seconds, 2), "flops": flops}


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What a number needs beside it: date, machine, library versions, commit and the exact command."""
    import torch

    from lmforge.metrics.runinfo import device_description, git_info

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()} {device_description()}",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_info(Path(__file__).resolve().parents[2]),
        "command": " ".join(argv if argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_claim_result(path: Path, argv, setup: dict, tuning: dict, verdicts: dict, claim: dict, tune_rows: list,
                       t_start: float) -> dict[str, Any]:  # fmt: skip
    """A tuned-then-claimed benchmark's result.json, in the one layout every such benchmark writes."""
    result = {
        "provenance": provenance(argv),
        "setup": setup,
        "tuning": tuning,
        "verdicts": verdicts,
        "claim": claim,
        "tune_runs": tune_rows,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    write_result(path, result)
    return result


def run_lmforge(*args: str, log: Path) -> tuple[dict[str, Any], float]:
    """Run `lmforge ARGS` in a fresh process of this Python from the repository root (where relative paths in
    ARGS point), its output to `log`: (its last JSON line, wall seconds). A failure ends the experiment, naming the
    log.

    A finished run is recorded beside its log (`log` with the suffix .done.json: the arguments, the commit, the
    output and the seconds) and reused, not rerun, when the same arguments are run again from the same clean commit:
    an experiment longer than one sitting is continued by running its command again. A dirty checkout never reuses
    (its code is not pinned by a commit)."""
    import subprocess

    from lmforge.metrics.runinfo import git_info

    root = Path(__file__).resolve().parents[2]
    git = git_info(root)
    record = log.with_name(log.name + ".done.json")
    if record.exists() and git["dirty"] is False:
        done = json.loads(record.read_text())
        if done["args"] == list(args) and done["commit"] == git["commit"]:
            return done["output"], done["seconds"]
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        cmd = [sys.executable, "-m", "lmforge.cli", *args]
        proc = subprocess.run(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"lmforge {args[0]} failed (exit {proc.returncode}); see {log}")
    last = [line for line in log.read_text().splitlines() if line.startswith("{")][-1]
    output, seconds = json.loads(last), time.perf_counter() - t0
    done = {"args": list(args), "commit": git["commit"], "output": output, "seconds": seconds}
    write_result(record, done)
    return output, seconds

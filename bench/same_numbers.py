"""Proof that a refactoring changed no number a user sees: run the user-facing commands on fixed, small budgets and
record every number they print and log, then compare two such records.

    python bench/same_numbers.py run OUT [--data DIR]     # writes OUT/numbers.json (about 15 min on one core)
    python bench/same_numbers.py compare A/numbers.json B/numbers.json

`run` executes, in this checkout (PYTHONPATH = its root, one thread, so the CPU kernels are deterministic):
`lmforge demo` (the full `make demo` experiment), `lmforge train` with a checkpoint and a resumed extension, a
teacher for `lmforge fuse` / `lmforge distill`, `bench/fusion.py` (all four methods, one-shot and recovery), and
`lmforge distill` with gradient accumulation, an LM-loss term and the plateau stop. For each it keeps the last JSON
line printed and every metrics.jsonl row with the timing fields removed (tokens/s, MFU, seconds: they measure the
machine, not the computation). `compare` prints every difference and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_s", "mfu", "mem", "seconds", "seconds_surgery", "elapsed", "time"}
PATH_KEYS = {"report", "plot", "out_dir", "teacher"}  # where the two runs wrote, not what they computed


def _strip(value):
    """The value without timing fields or paths (keys in TIMING_KEYS or PATH_KEYS, recursively)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS | PATH_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [_strip(json.loads(line)) for line in path.read_text().splitlines()] if path.is_file() else []


def _run(cmd: list[str], env: dict) -> dict:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    last = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
    return _strip(json.loads(last)) if last else {}


def run(out: Path, data: str) -> None:
    out.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    lm = [sys.executable, "-m", "lmforge.cli"]
    record: dict[str, dict] = {}

    def step(name: str, cmd: list[str], *folders: Path) -> None:
        record[name] = {"json": _run(cmd, env)}
        for f in folders:
            record[name][f"metrics:{f.relative_to(out)}"] = _metrics(f)

    demo = out / "demo"
    step("demo", [*lm, "demo", "--out", str(demo)], *(demo / r for r in ("source", "grown", "scratch")))
    train = out / "train"
    tiny = [*lm, "train", "recipes/tiny-cpu.yaml", f"--data.path={data}", f"--train.out_dir={train}"]
    tiny += ["--train.eval_every=10", "--train.ckpt_every=20", "--train.sample_tokens=8"]
    step("train", [*tiny, "--train.steps=40"], train)
    step("train-resumed", [*tiny, "--train.steps=60", "--resume"], train)
    teacher = out / "teacher"
    step(
        "teacher",
        [*lm, "train", "recipes/fuse-teacher-cpu.yaml", f"--data.path={data}", f"--train.out_dir={teacher}"]
        + ["--train.steps=60", "--train.eval_every=20", "--train.sample_tokens=8"],
        teacher,
    )
    fusion = out / "fusion"
    step(
        "fusion",
        [sys.executable, "bench/fusion.py", str(teacher / "final"), "--data", data, "--out", str(fusion)]
        + ["--hidden", "192", "--ffn", "600", "--heads", "6", "--kv-heads", "2", "--layers", "6", "--seq-len", "128"]
        + ["--calib-seqs", "16", "--eval-batches", "2", "--steps", "20", "--set", "train.eval_every=5"],
        *(fusion / "recover" / m for m in ("fuse", "prune", "drop", "random")),
    )
    record["fusion"]["one_shot"] = {
        m: _strip(json.loads((fusion / "logs" / f"fuse-{m}.log").read_text().strip().splitlines()[-1]))
        for m in ("fuse", "prune", "drop", "random")
    }
    distill = out / "distill"
    step(
        "distill",
        [*lm, "distill", "recipes/fuse-recover-cpu.yaml", f"--data.path={data}", f"--train.out_dir={distill}"]
        + [f"--train.init_from={fusion / 'students' / 'fuse'}", f"--distill.teacher={teacher / 'final'}"]
        + ["--train.steps=30", "--train.eval_every=5", "--train.micro_batch_size=8", "--distill.lm_weight=0.5"]
        + ["--distill.plateau_patience=2", "--distill.plateau_min_delta=0.2", "--train.sample_tokens=8"],
        distill,
    )
    (out / "numbers.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'numbers.json'}")


def compare(a: Path, b: Path) -> int:
    left, right = _strip(json.loads(a.read_text())), _strip(json.loads(b.read_text()))
    diffs: list[str] = []

    def walk(x, y, where: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    diffs.append(f"{where}.{k}: only in {'B' if k not in x else 'A'}")
                else:
                    walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            diffs.append(f"{where}: {x!r} != {y!r}")

    walk(left, right, "")
    for d in diffs:
        print(d)
    n = sum(1 for _ in json.dumps(left))
    print(f"{len(diffs)} difference(s) ({n:,} characters of numbers compared)")
    return 1 if diffs else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--data", default="runs/data/starter-bpe4096", help="starter corpus, 4096-token BPE")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args()
    if a.verb == "run":
        run(a.out.resolve(), a.data)
        return 0
    return compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())

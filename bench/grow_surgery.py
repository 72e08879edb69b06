"""Growth surgery speed and memory: `lmforge grow` on the real SmolLM2-135M, HF safetensors in and out.

    python bench/grow_surgery.py [--repeats N] [--cpus 0,1] [--cache DIR] [--no-check] [--quick]
                                 [--root DIR] [--baseline DIR]

The source is SmolLM2-135M-Instruct (lmforge.io.gguf.smollm2_gguf_path, Q4_1 dequantised) converted once with
`lmforge convert --dtype bfloat16` (HF SmolLM2's own dtype) and `--dtype float32` into a cache folder. Each
case runs `python -m lmforge.cli grow SRC --out DST ...` as a child process pinned to --cpus (default: two
cores) and measures its wall time, CPU time and peak memory (the child's max RSS from wait4) against the
size of the folder it wrote. Before every timed run the previous output is deleted and `sync` flushes dirty
pages, so that no run pays for the writeback of an earlier one; figures are medians over --repeats runs.
A separate `--check` run per case (not timed) gives the max relative logit error of grown vs source on
held-out text in float32. (A non-integer widening rescales the norm gains by sqrt(576 / 864), which a
bfloat16 checkpoint stores rounded: exact in float32, ~1e-2 in bfloat16.)

Target: the 2x-width clone of the bfloat16 checkpoint in <= 5 s on 2 cores with a peak of
<= 0.5x the output's size. Anchor: HyperCloning, 11-13 s and ~1.7x for the same growth on this machine.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from lmforge.data.packages import cache_dir  # noqa: E402
from lmforge.io.gguf import smollm2_gguf_path  # noqa: E402

# (name, lmforge grow arguments): SmolLM2-135M is hidden 576, 30 layers.
CASES = {
    "2x width": ["--hidden", "1152"],
    "1.5x width": ["--hidden", "864"],
    "45 layers": ["--layers", "45"],
}
DTYPES = ("bfloat16", "float32")
TARGET_S, TARGET_RATIO = 5.0, 0.5
ANCHOR = "HyperCloning: 11-13 s, peak ~1.7x the output (2x width clone, this machine)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (default 3)")
    p.add_argument("--cpus", default=None, help="CPUs to pin the runs to, e.g. 0,1 (default: the first two)")
    p.add_argument("--cache", type=Path, default=None, help="folder for the converted sources and outputs")
    p.add_argument("--no-check", action="store_true", help="skip the --check runs (exactness)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2x width in bfloat16 only, one run")
    p.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="lmforge checkout whose `grow` is measured (default: this one)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a second checkout (e.g. an older commit unpacked with `git archive`) timed in alternation with --root",
    )
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


def child_env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def build_sources(cache: Path) -> dict[str, Path]:
    """The SmolLM2 HF checkpoints (bfloat16, float32), converted from the GGUF on first use."""
    sources = {}
    for dtype in DTYPES:
        src = cache / f"smollm2-135m-hf-{dtype}"
        if not (src / "config.json").is_file():
            gguf = smollm2_gguf_path()
            cmd = [sys.executable, "-m", "lmforge.cli", "convert", str(gguf), str(src), "--dtype", dtype]
            subprocess.run(cmd, check=True, env=child_env(), stdout=subprocess.DEVNULL)
        sources[dtype] = src
    return sources


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def run_grow(src: Path, dst: Path, args: list[str], cpus: set[int], root: Path, check: bool = False) -> dict:
    """One `lmforge grow` child: wall s, CPU s, peak RSS bytes, output bytes, and --check's JSON if asked."""
    if dst.exists():
        shutil.rmtree(dst)
    os.sync()  # flush earlier runs' dirty pages: their writeback is not this run's cost
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "lmforge.cli", "grow", str(src), "--out", str(dst), *args]
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        start = time.perf_counter()
        child = subprocess.Popen(
            cmd + (["--check"] if check else []),
            env=child_env(root),
            cwd=root,  # `python -m` puts the working folder first on sys.path
            stdout=out_file,
            stderr=err_file,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        _, status, usage = os.wait4(child.pid, 0)  # wait4, not Popen.wait: it gives this child's own rusage
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0), err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.strip()}")
    result = {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "out_bytes": folder_bytes(dst),
        "load_before": load,
        "stdout": out.strip().splitlines()[0],
    }
    if check:
        result["check"] = json.loads(out.strip().splitlines()[-1])
    return result


def git_commit(root: Path) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (dirty tree)" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarize(runs: list[dict]) -> dict:
    """Medians over the timed runs of one case."""
    out_bytes = runs[0]["out_bytes"]
    peak = statistics.median(r["peak_rss_bytes"] for r in runs)
    return {
        "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 2),
        "wall_s_min": round(min(r["wall_s"] for r in runs), 2),
        "cpu_s_median": round(statistics.median(r["cpu_s"] for r in runs), 2),
        "peak_rss_mb": round(peak / 1e6),
        "out_mb": round(out_bytes / 1e6),
        "peak_over_out": round(peak / out_bytes, 3),
        "loads": [round(r["load_before"], 2) for r in runs],
    }


def describe(m: dict) -> str:
    return (
        f"{m['wall_s_median']:5.2f} s (min {m['wall_s_min']:.2f}, cpu {m['cpu_s_median']:.2f})  peak "
        f"{m['peak_rss_mb']:5d} MB / out {m['out_mb']:5d} MB = {m['peak_over_out']:.3f}x  load {m['loads']}"
    )


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    cache = (a.cache or cache_dir().parent / "bench-grow-surgery").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    allowed = sorted(os.sched_getaffinity(0))
    cpus = {int(c) for c in a.cpus.split(",")} if a.cpus else set(allowed[:2])
    cases = {"2x width": CASES["2x width"]} if a.quick else CASES
    dtypes = ("bfloat16",) if a.quick else DTYPES
    repeats = 1 if a.quick else a.repeats
    sources = build_sources(cache)

    machine = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "nproc": len(allowed),
        "pinned_cpus": sorted(cpus),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(a.root),
        "root": str(a.root),
        "baseline": str(a.baseline) if a.baseline else None,
        "loadavg_start": os.getloadavg(),
    }
    print(f"{machine['date']}  {machine['cpu']} x{machine['nproc']} (runs pinned to {sorted(cpus)}), "
          f"torch {machine['torch']}, commit {machine['commit']}, load {machine['loadavg_start'][0]:.2f}")  # fmt: skip
    results = []
    dst = cache / "out"
    for dtype in dtypes:
        for name, args in cases.items():
            runs, base_runs = [], []
            for _ in range(repeats):  # with a baseline, runs alternate so that both see the same machine load
                runs.append(run_grow(sources[dtype], dst, args, cpus, a.root))
                if a.baseline:
                    base_runs.append(run_grow(sources[dtype], dst, args, cpus, a.baseline))
            check = None if a.no_check else run_grow(sources[dtype], dst, args, cpus, a.root, check=True)["check"]
            shutil.rmtree(dst)
            row = {"dtype": dtype, "case": name, "args": args, **summarize(runs)}
            row["max_rel_logit_error"] = check["max_rel_logit_error"] if check else None
            row["src_loss"], row["dst_loss"] = (check["src_loss"], check["dst_loss"]) if check else (None, None)
            if name == "2x width":
                row["meets_target"] = row["wall_s_median"] <= TARGET_S and row["peak_over_out"] <= TARGET_RATIO
            err = f"{row['max_rel_logit_error']:.1e}" if check else "-"
            print(f"{dtype:9} {name:10} {describe(row)}  max rel logit err {err}", flush=True)
            if a.baseline:
                row["baseline"] = summarize(base_runs)
                print(f"{'':9} {'baseline':10} {describe(row['baseline'])}", flush=True)
            results.append(row)
    machine["loadavg_end"] = os.getloadavg()
    print(f"anchor: {ANCHOR}; target: <= {TARGET_S} s and <= {TARGET_RATIO}x for 2x width")
    print(json.dumps({"machine": machine, "repeats": repeats, "anchor": ANCHOR, "results": results}))


if __name__ == "__main__":
    main()

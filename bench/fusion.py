"""Fusion against its baselines at equal size and equal token budget.

    python bench/fusion.py TEACHER --data DIR --out DIR [--hidden N --ffn N --heads N --kv-heads N --layers N]
                           [--recipe recipes/fuse-recover-cpu.yaml] [--steps N] [--methods fuse,prune,drop,random]
                           [--calib-seqs N] [--one-shot-only] [--reuse-students] [--keep M,...]
                           [--set section.key=value ...]

For every method, `lmforge fuse TEACHER --method M` makes the student (one-shot validation perplexity on the
data's validation split), then `lmforge distill RECIPE` trains it against the teacher for the same number of
steps (same data order, same optimizer). Every student's validation perplexity is read from its metrics.jsonl
at every evaluation (step 0 = before any training), plotted against training tokens beside the teacher's, and
tabulated in OUT/report.md. Commands run as subprocesses of this Python, one at a time, so the timings and the
machine's load belong to one run. The last line printed is one JSON object. `--keep prune,drop,random` reuses
those methods' students and recovery runs from an earlier run in OUT (with the same arguments), so that a
change to one method is measured again without repeating the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.metrics.report import markdown_table, read_metrics  # noqa: E402
from lmforge.objectives.lm import perplexity  # noqa: E402

METHODS = ("fuse", "prune", "prune-refit", "prune-map", "drop", "random")
LABELS = {
    "fuse": "fusion (lmforge)",
    "prune": "width + depth pruning (Minitron-style)",
    "prune-refit": "pruning + fusion's writer refit",
    "prune-map": "pruning + writer refit + fusion's hidden-map search",
    "drop": "layer dropping (ShortGPT-style)",
    "random": "random init",
}


def lmforge(*args: str, log: Path) -> dict:
    """Run `lmforge ARGS` (this Python), tee its output to `log`, return its last line as JSON."""
    cmd = [sys.executable, "-m", "lmforge.cli", *args]
    print("$ lmforge " + " ".join(args), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = ""
        for line in proc.stdout:
            f.write(line)
            if line.strip():
                last = line.strip()
                if not line.startswith("{"):
                    print("  " + line.rstrip()[-160:], flush=True)
        if proc.wait():
            sys.exit(f"lmforge {args[0]} failed (exit {proc.returncode}); see {log}")
    return json.loads(last)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    for flag in ("--hidden", "--ffn", "--heads", "--kv-heads", "--layers"):
        p.add_argument(flag, type=int)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "fuse-recover-cpu.yaml"))
    p.add_argument("--steps", type=int, help="recovery steps (default: the recipe's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="calibration and one-shot evaluation length")
    p.add_argument("--eval-batches", type=int, default=8, help="one-shot evaluation batches of 8 sequences")
    p.add_argument("--one-shot-only", action="store_true", help="fuse and evaluate, no recovery training")
    p.add_argument(
        "--reuse-students", action="store_true", help="keep students (and one-shot results) an earlier run left in OUT"
    )
    p.add_argument("--keep", default="", help="methods whose students and recovery runs in OUT are reused")
    p.add_argument("--set", action="append", default=[], help="extra recipe override section.key=value")
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    keep = set(filter(None, a.keep.split(",")))
    unknown = (set(methods) | keep) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    sizes = []
    for flag in ("hidden", "ffn", "heads", "kv_heads", "layers"):
        if getattr(a, flag) is not None:
            sizes += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]

    one_shot, runs, seconds = {}, {}, {}
    for m in methods:
        t0 = time.perf_counter()
        log = out / "logs" / f"fuse-{m}.log"
        if (a.reuse_students or m in keep) and (out / "students" / m / "config.json").is_file() and log.is_file():
            one_shot[m] = json.loads(log.read_text().strip().splitlines()[-1])
            continue
        one_shot[m] = lmforge(
            "fuse", a.teacher, "--out", str(out / "students" / m), "--method", m, "--data", a.data,
            "--calib-seqs", str(a.calib_seqs), "--seq-len", str(a.seq_len), "--eval-batches", str(a.eval_batches),
            "--overwrite", *sizes, log=log,
        )  # fmt: skip
        seconds[f"fuse-{m}"] = round(time.perf_counter() - t0, 1)
    if not a.one_shot_only:
        for m in methods:
            t0 = time.perf_counter()
            run_dir = out / "recover" / m
            if m in keep and (run_dir / "metrics.jsonl").is_file():
                runs[m] = read_metrics(run_dir)
                continue
            overrides = [
                f"--train.init_from={out / 'students' / m}",
                f"--distill.teacher={a.teacher}",
                f"--data.path={a.data}",
                f"--train.out_dir={run_dir}",
                *([f"--train.steps={a.steps}"] if a.steps else []),
                *[f"--{kv}" for kv in a.set],
            ]
            if run_dir.exists():
                shutil.rmtree(run_dir)
            lmforge("distill", a.recipe, *overrides, log=out / "logs" / f"distill-{m}.log")
            runs[m] = read_metrics(run_dir)
            seconds[f"distill-{m}"] = round(time.perf_counter() - t0, 1)
    result = report(a, out, methods, one_shot, runs, seconds)
    print(json.dumps(result))
    return result


def evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("val_loss") is not None]


def report(a, out: Path, methods, one_shot: dict, runs: dict, seconds: dict) -> dict:
    first = one_shot[methods[0]]
    teacher_ppl = first["source_ppl"]
    result: dict = {
        "teacher": a.teacher,
        "teacher_params": first["source_params"],
        "student_params": {m: one_shot[m]["target_params"] for m in methods},
        "one_shot_ppl": {m: one_shot[m]["ppl"] for m in methods},
        "one_shot_teacher_ppl": teacher_ppl,
        "seconds": seconds,
    }
    lines = [
        f"# Fusion vs baselines: {a.teacher}",
        "",
        f"Teacher: {first['source_params']:,} parameters; students: "
        + ", ".join(f"{m} {one_shot[m]['target_params']:,}" for m in methods)
        + ".",
        "",
        f"## One-shot (before any training), {a.eval_batches} x 8 x {a.seq_len} validation tokens",
        "",
        markdown_table(
            ["method", "params", "val ppl", "x teacher"],
            [[LABELS[m], one_shot[m]["target_params"], one_shot[m]["ppl"], one_shot[m]["ppl_ratio"]] for m in methods]
            + [["teacher", first["source_params"], teacher_ppl, 1.0]],
        ),
    ]
    if runs:
        t_ppl = next((r["teacher_val_ppl"] for r in evals(runs[methods[0]]) if r.get("teacher_val_ppl")), None)
        t_ppl = t_ppl or teacher_ppl
        curves = {m: [(r["tokens"], perplexity(r["val_loss"])) for r in evals(runs[m])] for m in methods}
        budgets = sorted(set.intersection(*(set(t for t, _ in curves[m]) for m in methods)))
        table = [[t] + [dict(curves[m])[t] for m in methods] for t in budgets]
        beats = [
            all(dict(curves["fuse"])[t] < dict(curves[m])[t] for m in methods if m != "fuse") for t in budgets
        ] if "fuse" in methods else []  # fmt: skip
        final = {m: curves[m][-1][1] for m in methods}
        result |= {
            "recovery_teacher_ppl": t_ppl,
            "tokens": budgets[-1] if budgets else 0,
            "final_ppl": final,
            "final_ratio_to_teacher": {m: final[m] / t_ppl for m in methods},
            "fuse_best_at_every_budget": all(beats) if beats else None,
            "fuse_best_at_budgets": sum(beats),
            "budgets": len(budgets),
        }
        plot = _plot(curves, t_ppl, out / "fusion.png", a.teacher)
        lines += [
            "",
            f"## Recovery against the teacher (`lmforge distill {Path(a.recipe).name}`), validation perplexity",
            "",
            f"Teacher val ppl {t_ppl:.3f} on the same batches. ![perplexity vs tokens]({plot.name})",
            "",
            markdown_table(["tokens"] + [m for m in methods], table),
            "",
            "Final ppl / teacher ppl: " + ", ".join(f"{m} {final[m] / t_ppl:.3f}" for m in methods) + ".",
        ]
        if beats:
            lines.append(f"Fusion has the lowest perplexity at {sum(beats)} of {len(budgets)} budgets.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def _plot(curves: dict, teacher_ppl: float, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, (m, pts) in enumerate(curves.items()):
        ax.plot([t for t, _ in pts], [v for _, v in pts], "o-", color=f"C{i}", markersize=3, label=LABELS[m])
    ax.axhline(teacher_ppl, color="grey", linestyle="--", linewidth=1, label=f"teacher {teacher_ppl:.2f}")
    ax.axhline(1.3 * teacher_ppl, color="grey", linestyle=":", linewidth=1, label="1.3 x teacher")
    ax.set_yscale("log")
    ax.set_xlabel("recovery tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Fused and baseline students of {title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

"""Fusion against its baselines by the protocol of lmforge/experiments/harness.py: tuned recovery, seeds, test split.

    python bench/fusion_claim.py TEACHER --data DIR --out bench/results/NAME [--hidden N --ffn N --heads N
        --kv-heads N --layers N] [--recipe recipes/fuse-recover-cpu.yaml] [--methods fuse,prune,prune-refit,...]
        [--seeds 0,1,2] [--tune-seed 1000] [--lrs 7.5e-4,1.5e-3,3e-3] [--steps N] [--test-batches 50]
        [--work runs/bench-fusion] [--set section.key=value ...]

1. Tuning, on validation only, with its own seed: for every method, the student made with calibration draw (or,
   for random init, initialisation) --tune-seed is recovered with `lmforge distill` at each lr of the grid, widened
   until the best is inside; the score is the final validation LM loss. Random init gets its own search like every
   other arm.
2. Claim, on the test split, for each seed: `lmforge fuse --seed S` (another calibration draw), `lmforge distill`
   at the method's tuned lr with train.seed S, then `lmforge eval --split test` on --test-batches x 8 x seq-len
   tokens (102,400 by default), before and after recovery. Every stage is charged: surgery seconds (calibration
   included), recovery seconds, student training FLOPs and the teacher's forward FLOPs.
3. Each baseline against fusion: the mean over seeds of the paired difference of test log-perplexity, with its
   bootstrap interval; a difference whose interval holds 0 is not called a difference.

Writes OUT/result.json and OUT/report.md; the last line printed is the summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import lr_search, paired_bootstrap, provenance, run_lmforge, spread, write_result  # noqa: E402
from lmforge.metrics.report import markdown_table  # noqa: E402

METHODS = ("fuse", "prune", "prune-refit", "prune-map", "drop", "random")


def lmforge(*args: str, log: Path) -> tuple[dict, float]:
    return run_lmforge(*args, log=log)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher")
    p.add_argument("--data", required=True, help="token dataset with a test split, built with the teacher's tokenizer")
    p.add_argument("--out", required=True, type=Path)
    for flag in ("--hidden", "--ffn", "--heads", "--kv-heads", "--layers"):
        p.add_argument(flag, type=int)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "fuse-recover-cpu.yaml"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--lrs", default="7.5e-4,1.5e-3,3e-3", help="recovery lr grid (widened as needed)")
    p.add_argument("--steps", type=int, help="recovery steps (default: the recipe's)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation length")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--test-batches", type=int, default=50, help="test windows = this x 8 (x seq-len tokens)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-fusion")
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value")
    a = p.parse_args(argv)
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    if set(methods) - set(METHODS) or a.tune_seed in seeds:
        p.error("unknown method, or --tune-seed among --seeds")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    sizes = [x for flag in ("hidden", "ffn", "heads", "kv_heads", "layers") if getattr(a, flag) is not None
             for x in (f"--{flag.replace('_', '-')}", str(getattr(a, flag)))]  # fmt: skip
    t_start = time.perf_counter()

    def student(method: str, seed: int) -> tuple[Path, dict]:
        out = a.work / "students" / f"{method}-seed{seed}"
        report, seconds = lmforge(
            "fuse", a.teacher, "--out", str(out), "--method", method, "--data", a.data, "--seed", str(seed),
            "--calib-seqs", str(a.calib_seqs), "--seq-len", str(a.seq_len), "--eval-batches", "0", "--overwrite",
            *sizes, log=a.work / "logs" / f"fuse-{method}-seed{seed}.log",
        )  # fmt: skip
        return out, {**report, "wall_seconds": seconds}

    def recover(method: str, seed: int, init: Path, lr: float, tag: str) -> tuple[dict, float]:
        run = a.work / "recover" / f"{method}-{tag}"
        args = [f"--train.init_from={init}", f"--distill.teacher={a.teacher}", f"--data.path={a.data}",
                f"--train.out_dir={run}", f"--train.seed={seed}", f"--optim.lr={lr}",
                *([f"--train.steps={a.steps}"] if a.steps else []), *[f"--{kv}" for kv in a.set]]  # fmt: skip
        if run.exists():
            import shutil

            shutil.rmtree(run)
        return lmforge("distill", a.recipe, *args, log=a.work / "logs" / f"distill-{method}-{tag}.log")

    def test_loss(model: Path, tag: str) -> float:
        r, _ = lmforge(
            "eval", str(model), "--data", a.data, "--split", "test", "--batches", str(a.test_batches),
            "--batch-size", "8", "--seq-len", str(a.seq_len), log=a.work / "logs" / f"eval-{tag}.log",
        )  # fmt: skip
        return r["loss"]

    tuning, best = {}, {}
    for m in methods:
        init, _ = student(m, a.tune_seed)

        def score(lr: float, m: str = m, init: Path = init) -> float:
            return recover(m, a.tune_seed, init, lr, f"tune-lr{lr:g}")[0]["val_loss"]

        search = lr_search(score, [float(x) for x in a.lrs.split(",")])
        tuning[m], best[m] = search, search["best"]
    claims: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            init, surgery = student(m, seed)
            one_shot = test_loss(init, f"{m}-seed{seed}-oneshot")
            summary, seconds = recover(m, seed, init, best[m], f"seed{seed}")
            final = test_loss(Path(summary["out_dir"]) / "final", f"{m}-seed{seed}")
            claims[m].append({
                "seed": seed, "one_shot_test_loss": one_shot, "test_loss": final, "test_ppl": math.exp(final),
                "val_loss": summary["val_loss"], "teacher_val_loss": summary["teacher_val_loss"],
                "surgery_seconds": surgery["wall_seconds"], "recovery_seconds": seconds,
                "student_flops": summary["flops"], "teacher_flops": summary["teacher_flops"],
                "target_params": surgery["target_params"], "source_params": surgery["source_params"],
            })  # fmt: skip
    teacher_test = test_loss(Path(a.teacher), "teacher")
    summary = {
        m: {
            "test_ppl": spread([c["test_ppl"] for c in claims[m]]),
            "one_shot_test_ppl": spread([math.exp(c["one_shot_test_loss"]) for c in claims[m]]),
            "seconds": spread([c["surgery_seconds"] + c["recovery_seconds"] for c in claims[m]]),
            "lr": best[m],
            "lr_inside_grid": tuning[m]["inside"],
        }
        for m in methods
    }
    if "fuse" in methods:
        for m in methods:
            if m != "fuse":  # > 0: the baseline's test log-perplexity is higher than fusion's
                summary[m]["log_ppl_minus_fuse"] = paired_bootstrap(
                    [c["test_loss"] for c in claims[m]], [c["test_loss"] for c in claims["fuse"]]
                )
    result = {
        "provenance": provenance(),
        "teacher": a.teacher,
        "teacher_test_ppl": math.exp(teacher_test),
        "test_tokens": a.test_batches * 8 * a.seq_len,
        "tuning": tuning,
        "claims": claims,
        "summary": summary,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_result(a.out / "result.json", result)
    (a.out / "report.md").write_text(report(result))
    print(json.dumps({"teacher_test_ppl": result["teacher_test_ppl"], "summary": summary}))
    return result


def report(r: dict) -> str:
    s = r["summary"]
    rows = []
    for m, v in s.items():
        d = v.get("log_ppl_minus_fuse")
        diff = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d else ""
        ppl, one_shot = v["test_ppl"], v["one_shot_test_ppl"]["mean"]
        lr = f"{v['lr']:g}" + ("" if v["lr_inside_grid"] else " (grid edge)")
        rows.append([m, f"{ppl['mean']:.2f} +- {ppl['std']:.2f}", f"{one_shot:.1f}", diff, lr,
                     f"{v['seconds']['mean']:.0f}"])  # fmt: skip
    return "\n".join([
        f"# Fusion against its baselines, on the test split ({r['test_tokens']:,} tokens)",
        "",
        f"Teacher {r['teacher']}: test perplexity {r['teacher_test_ppl']:.2f}.",
        "",
        markdown_table(["method", "test ppl after recovery (mean +- sd over seeds)", "one-shot test ppl",
                        "test log-ppl minus fusion's [95% bootstrap]", "tuned lr", "seconds (surgery + recovery)"],
                       rows),  # fmt: skip
        "",
        f"Commit {r['provenance']['git']['commit']}, {r['provenance']['machine']}, torch {r['provenance']['torch']}, "
        f"{r['provenance']['date']}; `{r['provenance']['command']}`; {r['seconds']:.0f} s in all.",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()

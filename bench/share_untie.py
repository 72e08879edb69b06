"""Share-then-untie against ordinary training, by the protocol of lmforge/experiments/harness.py.

    python bench/share_untie.py --out bench/results/NAME [--data DIR] [--arms ordinary,all-10,groups4-10,adaptive]
                                [--seeds 0,1,2] [--tune-seed 1000] [--lrs 1.5e-3,3e-3,6e-3] [--steps N]
                                [--work runs/bench-share] [--set section.key=value ...]

recipes/share-untie-cpu.yaml: a deep, thin decoder (12 layers x 128, 4 heads, FFN 344; batch 16 x 128 tokens) on a
token dataset with a test split. Arms (train/sharing.py; each replaces the recipe's share section):
- ordinary;
- all-10: every layer one shared unit, untied at 10% of the steps (the paper's fixed rule);
- groups4-10: groups of 4 consecutive layers, untied at 10%;
- adaptive: every layer shared, untied by the gradient condition (adjacent layers' gradient correlation below 0.5
  for half the pairs, 3 checks in a row, checked every 10 steps).
1. Tuning, on validation only, with --tune-seed: each arm's peak lr on a grid widened until the best is inside;
   the score is the final validation loss.
2. Claim, on the test split, for each seed: every arm at its tuned lr, the same data order. The target is the
   ordinary run's final TEST loss; each arm's cost is the training FLOPs its test curve needs to reach it
   (interpolated between evaluations; FLOPs count every use of a shared layer), as a fraction of the ordinary
   run's. Also the final test loss of each arm against the ordinary run's (paired differences, bootstrap interval).
Writes OUT/result.json, OUT/report.md and OUT/loss_vs_flops.png (seed 0); the last line printed is the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.arms import against_baseline, summary_line, train_run, tune_then_claim, verdict_table  # noqa: E402
from lmforge.experiments.harness import provenance, write_result  # noqa: E402
from lmforge.metrics.report import plot_curves, read_metrics  # noqa: E402

RECIPE = ROOT / "recipes" / "share-untie-cpu.yaml"
ARMS = {
    "ordinary": ["--share.groups=none"],
    "all-10": ["--share.groups=all", "--share.untie_fraction=0.1"],
    "groups4-10": ["--share.groups=consecutive", "--share.size=4", "--share.untie_fraction=0.1"],
    "adaptive": ["--share.groups=all", "--share.grad_corr_below=0.5", "--share.grad_checks=3", "--share.grad_every=10"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default="runs/data/starter3-bpe4096", help="a token dataset with a test split")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3", help="each arm's lr grid (widened as needed)")
    p.add_argument("--steps", type=int, help="training steps of every run (default: the recipe's)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-share")
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value, every run")
    a = p.parse_args(argv)
    arms, seeds = a.arms.split(","), [int(s) for s in a.seeds.split(",")]
    if "ordinary" not in arms or set(arms) - set(ARMS) or a.tune_seed in seeds:
        p.error(f"--arms: ordinary and others of {', '.join(ARMS)}; --tune-seed not among --seeds")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    common = [f"--data.path={a.data}", *([f"--train.steps={a.steps}"] if a.steps else []), *(f"--{kv}" for kv in a.set)]
    t_start = time.perf_counter()

    def train(arm: str, lr: float, seed: int, test: bool) -> dict:
        out = a.work / ("claim" if test else "tune") / arm / (f"seed{seed}" if test else f"lr{lr:g}")
        # each arm says when it unties: the recipe's own rule is cleared first
        return train_run(RECIPE, ["--share.untie_fraction=0", *ARMS[arm], *common], arm, lr, seed, out, test)

    tuning, claim, tune_rows = tune_then_claim(train, arms, [float(x) for x in a.lrs.split(",")], seeds, a.tune_seed)
    verdicts = against_baseline(claim, "ordinary")
    for arm in arms:
        verdicts[arm]["untie_steps"] = [next((e["step"] for e in r["events"]), None) for r in claim[arm]]

    a.out.mkdir(parents=True, exist_ok=True)
    curves = {arm: read_metrics(claim[arm][0]["out_dir"]) for arm in arms}
    plot_curves(curves, a.out / "loss_vs_flops.png", title=f"share-then-untie, seed {seeds[0]}", val_key="test_loss")
    result = {
        "provenance": provenance(argv),
        "setup": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": a.steps, "arms": {k: ARMS[k] for k in arms}},
        "tuning": tuning,
        "verdicts": verdicts,
        "claim": claim,
        "tune_runs": tune_rows,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    write_result(a.out / "result.json", result)
    untie = {arm: str(v["untie_steps"]) for arm, v in verdicts.items()}
    table = verdict_table(verdicts, tuning, ("untie step", untie))
    (a.out / "report.md").write_text(f"# share-then-untie ({result['provenance']['date']})\n\n{table}")
    print(json.dumps(summary_line(verdicts)))
    return result


if __name__ == "__main__":
    main()

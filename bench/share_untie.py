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

from lmforge.commands.train import load_train_recipe  # noqa: E402
from lmforge.experiments.growth import flops_to_reach  # noqa: E402
from lmforge.experiments.harness import lr_search, paired_bootstrap, provenance, spread, write_result  # noqa: E402
from lmforge.metrics.report import markdown_table, plot_curves, read_metrics  # noqa: E402
from lmforge.train.loop import Trainer, run_trainer  # noqa: E402

RECIPE = ROOT / "recipes" / "share-untie-cpu.yaml"
ARMS = {
    "ordinary": ["--share.groups=none"],
    "all-10": ["--share.groups=all", "--share.untie_fraction=0.1"],
    "groups4-10": ["--share.groups=consecutive", "--share.size=4", "--share.untie_fraction=0.1"],
    "adaptive": ["--share.groups=all", "--share.grad_corr_below=0.5", "--share.grad_checks=3", "--share.grad_every=10"],
}


def train(arm: str, lr: float, seed: int, steps: int, data: str, out: Path, test: bool, extra: list[str]) -> dict:
    overrides = [
        "--share.untie_fraction=0",  # each arm says when it unties
        *ARMS[arm],
        f"--data.path={data}",
        f"--optim.lr={lr}",
        *([f"--train.steps={steps}"] if steps else []),
        f"--train.seed={seed}",
        f"--train.out_dir={out}",
        f"--train.eval_test={'true' if test else 'false'}",
        "--train.sample_prompts=[]",
        "--train.export_hf=false",
        *extra,
    ]
    recipe, sections = load_train_recipe(RECIPE, overrides)
    t0 = time.perf_counter()
    _, summary = run_trainer(lambda: Trainer(recipe, share=sections["share"]))
    rows = read_metrics(out)
    untie = next((r for r in rows if r.get("event") == "untie"), None)
    return {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "val_loss": summary["val_loss"],
        "test_loss": summary.get("test_loss"),
        "flops": summary["flops"],
        "seconds": round(time.perf_counter() - t0, 1),
        "untie_step": untie["step"] if untie else None,
        "untie_reason": untie["reason"] if untie else None,
        "out_dir": str(out),
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
    extra = [f"--{kv}" for kv in a.set]
    grid = [float(x) for x in a.lrs.split(",")]
    t_start = time.perf_counter()

    tuning, runs = {}, {}
    for arm in arms:

        def score(lr: float, arm: str = arm) -> float:
            row = train(arm, lr, a.tune_seed, a.steps, a.data, a.work / "tune" / arm / f"lr{lr:g}", False, extra)
            runs.setdefault("tune", []).append(row)
            print(json.dumps(row), flush=True)
            return row["val_loss"]

        tuning[arm] = lr_search(score, grid)
        print(f"# {arm}: best lr {tuning[arm]['best']:g} of {tuning[arm]['scores']}", flush=True)

    claim: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            out = a.work / "claim" / arm / f"seed{seed}"
            row = train(arm, tuning[arm]["best"], seed, a.steps, a.data, out, True, extra)
            claim[arm].append(row)
            print(json.dumps(row), flush=True)

    verdicts = {}
    for arm in arms:
        fractions, reached = [], []
        for row, base in zip(claim[arm], claim["ordinary"]):
            target = base["test_loss"]
            pts = [(r["flops"], r["test_loss"]) for r in read_metrics(row["out_dir"]) if r.get("test_loss") is not None]
            need = flops_to_reach(pts, target)
            reached.append(need is not None)
            fractions.append(need / base["flops"] if need is not None else float("nan"))
        verdicts[arm] = {
            "flops_fraction_to_reach_ordinary": spread([f for f in fractions if f == f]) if all(reached) else None,
            "fractions": fractions,
            "reached": reached,
            "test_loss": spread([r["test_loss"] for r in claim[arm]]),
            "test_loss_minus_ordinary": paired_bootstrap(
                [r["test_loss"] for r in claim[arm]], [r["test_loss"] for r in claim["ordinary"]]
            ),
            "untie_steps": [r["untie_step"] for r in claim[arm]],
            "seconds": spread([r["seconds"] for r in claim[arm]]),
        }

    curves = {arm: read_metrics(claim[arm][0]["out_dir"]) for arm in arms}
    a.out.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, a.out / "loss_vs_flops.png", title=f"share-then-untie, seed {seeds[0]}", val_key="test_loss")
    result = {
        "provenance": provenance(argv),
        "setup": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": a.steps, "arms": {k: ARMS[k] for k in arms}},
        "tuning": tuning,
        "verdicts": verdicts,
        "claim": claim,
        "tune_runs": runs.get("tune", []),
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    write_result(a.out / "result.json", result)
    rows = []
    for arm, v in verdicts.items():
        f, d = v["flops_fraction_to_reach_ordinary"], v["test_loss_minus_ordinary"]
        frac = f"{f['mean']:.3f} (sd {f['std']:.3f})" if f else f"not reached by all seeds {v['fractions']}"
        rows.append(
            [
                arm,
                f"{tuning[arm]['best']:g}",
                frac,
                f"{v['test_loss']['mean']:.4f} (sd {v['test_loss']['std']:.4f})",
                f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]",
                str(v["untie_steps"]),
            ]
        )
    header = ["arm", "tuned lr", "FLOPs to ordinary's test loss", "final test loss", "- ordinary [95% CI]", "untie"]
    (a.out / "report.md").write_text(
        f"# share-then-untie ({result['provenance']['date']})\n\n" + markdown_table(header, rows) + "\n"
    )
    summary = {
        arm: {
            "flops_fraction": None
            if not v["flops_fraction_to_reach_ordinary"]
            else round(v["flops_fraction_to_reach_ordinary"]["mean"], 3),
            "test_minus_ordinary": round(v["test_loss_minus_ordinary"]["mean"], 4),
        }
        for arm, v in verdicts.items()
    }
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()

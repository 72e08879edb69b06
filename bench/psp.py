"""PSP++ held-out co-training against ordinary training and its parameter-matched control (harness protocol).

    python bench/psp.py --out bench/results/NAME [--data DIR] [--arms ordinary,control,psp,no-detach]
                        [--seeds 0,1,2] [--tune-seed 1000] [--lrs 1.5e-3,3e-3,6e-3] [--steps N]
                        [--work runs/bench-psp] [--set section.key=value ...]

recipes/psp-cpu.yaml: a 4 x 128 decoder (FFN 344, 4 heads; batch 16 x 128 tokens) whose 2 lower layers read 2
held-out heads each from a 64-wide held-out model (model/heldout.py). Arms:
- ordinary: the same decoder without held-out heads;
- control: the held-out heads present but trained by the main loss only (loss weight 0, states not detached): the
  same parameters and FLOPs per token bar the held-out LM head, so a gain of psp over it is the separate loss's;
- psp: the method, the held-out heads on their own loss, their states detached into the main model;
- no-detach: psp with the main loss also reaching the held-out heads (an ablation).
Each arm's lr is tuned on validation, then 3 seeds are read on the test split (lmforge/experiments/arms.py): the
FLOPs each arm needs to reach the ordinary run's final test loss (the held-out model's FLOPs counted), and the
final test loss at equal tokens, paired by seed. Writes OUT/result.json, OUT/report.md and OUT/loss_vs_flops.png.
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

RECIPE = ROOT / "recipes" / "psp-cpu.yaml"
ARMS = {
    "ordinary": ["--model.heldout_layers=0", "--model.heldout_heads=0", "--model.heldout_width=null"],
    "control": ["--heldout.loss_weight=0", "--model.heldout_detach=false"],
    "psp": [],
    "no-detach": ["--model.heldout_detach=false"],
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
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-psp")
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
        return train_run(RECIPE, [*ARMS[arm], *common], arm, lr, seed, out, test)

    tuning, claim, tune_rows = tune_then_claim(train, arms, [float(x) for x in a.lrs.split(",")], seeds, a.tune_seed)
    verdicts = against_baseline(claim, "ordinary")
    flops_per_token = {arm: claim[arm][0]["flops"] / claim[arm][0]["tokens"] for arm in arms}

    a.out.mkdir(parents=True, exist_ok=True)
    curves = {arm: read_metrics(claim[arm][0]["out_dir"]) for arm in arms}
    plot_curves(curves, a.out / "loss_vs_flops.png", title=f"PSP++, seed {seeds[0]}", val_key="test_loss")
    result = {
        "provenance": provenance(argv),
        "setup": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": a.steps, "arms": {k: ARMS[k] for k in arms}},
        "flops_per_token": flops_per_token,
        "tuning": tuning,
        "verdicts": verdicts,
        "claim": claim,
        "tune_runs": tune_rows,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    write_result(a.out / "result.json", result)
    cost = {arm: f"{flops_per_token[arm] / flops_per_token['ordinary']:.3f}" for arm in arms}
    table = verdict_table(verdicts, tuning, ("FLOPs per token / ordinary", cost))
    (a.out / "report.md").write_text(f"# PSP++ ({result['provenance']['date']})\n\n{table}")
    print(json.dumps(summary_line(verdicts)))
    return result


if __name__ == "__main__":
    main()

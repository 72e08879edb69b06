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
Each arm's lr is tuned on validation, then the seeds are read on the test split (lmforge/experiments/arms.py): the
training FLOPs each arm needs to reach the ordinary run's final test loss (every use of a shared layer counted), as
a fraction of the ordinary run's, and the final test loss against it, paired by seed. Writes OUT/result.json,
OUT/report.md and OUT/loss_vs_flops.png (the first seed's test curves, the untie marked).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.arms import bench_main  # noqa: E402

ARMS = {  # the recipe's own untie rule is cleared first: each arm says when it unties
    "ordinary": ["--share.groups=none", "--share.untie_fraction=0"],
    "all-10": ["--share.groups=all", "--share.untie_fraction=0.1"],
    "groups4-10": ["--share.groups=consecutive", "--share.size=4", "--share.untie_fraction=0.1"],
    "adaptive": [
        "--share.groups=all",
        "--share.untie_fraction=0",
        "--share.grad_corr_below=0.5",
        "--share.grad_checks=3",
        "--share.grad_every=10",
    ],
}


def untie_steps(verdicts: dict, claim: dict) -> tuple[str, dict[str, str]]:
    return "untie step", {arm: str([next((e["step"] for e in r["events"]), None) for r in claim[arm]]) for arm in claim}


if __name__ == "__main__":
    recipe, work = ROOT / "recipes" / "share-untie-cpu.yaml", ROOT / "runs" / "bench-share"
    bench_main(__doc__, recipe, ARMS, None, work, "share-then-untie", untie_steps)

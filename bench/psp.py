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

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.arms import bench_main  # noqa: E402

ARMS = {
    "ordinary": ["--model.heldout_layers=0", "--model.heldout_heads=0", "--model.heldout_width=null"],
    "control": ["--heldout.loss_weight=0", "--model.heldout_detach=false"],
    "psp": [],
    "no-detach": ["--model.heldout_detach=false"],
}


def cost(verdicts: dict, claim: dict) -> tuple[str, dict[str, str]]:
    """Training FLOPs per token against the ordinary run's (the control is charged the held-out LM head it has)."""
    per_token = {arm: rows[0]["flops"] / rows[0]["tokens"] for arm, rows in claim.items()}
    return "FLOPs per token / ordinary", {arm: f"{v / per_token['ordinary']:.3f}" for arm, v in per_token.items()}


if __name__ == "__main__":
    bench_main(__doc__, ROOT / "recipes" / "psp-cpu.yaml", ARMS, None, ROOT / "runs" / "bench-psp", "PSP++", cost)

"""Which learning rate does a grown model take? The grown run of a finished growth experiment, again at other rates.

    python bench/growth_lr.py EXP --lr 5e-4 [--warmup 20] [--schedule cosine|constant] [--steps N] [--stop N]
                              [--eval-every N] [--start grown|source] [--init DIR] [--no-moments] [--out DIR]

EXP is an `lmforge demo` folder (e.g. runs/growth-cpu). The run takes EXP/grown/config.yaml (the grown run's recipe:
same data order, batch and steps) and changes only the optimizer's lr, warm-up and schedule:

- `--start grown` (default): from EXP/grown-init, with the source's AdamW moments grown through the same map (as the
  experiment's growth.optimizer_state does; `--no-moments`: fresh moments; `--init DIR`: another grown model of the
  same shape instead, e.g. one `lmforge grow` made without noise);
- `--start source`, the control: the source itself, not grown, continued from EXP/source's final weights and
  moments. If the source alone loses as much as the grown model at the same lr (scaled by the width ratio, as
  AdamW's updates to cloned readers are), the loss is the rewarming of a trained model, not the growth.

`--steps` is the schedule's length (default: the grown run's); `--stop` ends the run earlier on the same schedule.
The last line printed is one JSON object: the validation loss at every evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.errors import UserError  # noqa: E402
from lmforge.metrics.report import read_metrics  # noqa: E402
from lmforge.surgery.grow_optim import grow_optimizer_state, load_optimizer_state, read_training_checkpoint  # noqa: E402
from lmforge.train.loop import Trainer, run_trainer  # noqa: E402
from lmforge.train.recipe import load_recipe  # noqa: E402
from lmforge.train.stop import StepLimit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", type=Path)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--schedule", default=None, help="default: the grown run's")
    ap.add_argument("--steps", type=int, default=None, help="the schedule's length; default: the grown run's")
    ap.add_argument("--stop", type=int, default=0, help="end after this many steps (0: at --steps)")
    ap.add_argument("--eval-every", type=int, default=None, help="default: the grown run's")
    ap.add_argument("--start", choices=("grown", "source"), default="grown")
    ap.add_argument("--init", type=Path, default=None, help="start from this model instead (--start grown)")
    ap.add_argument("--no-moments", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    exp = a.exp
    if not all((exp / f).exists() for f in ("recipe.yaml", "grown/config.yaml", "grown-init", "source")):
        raise UserError(f"{exp} is not the folder of a finished `lmforge demo`")
    section = yaml.safe_load((exp / "grown" / "config.yaml").read_text())
    section.pop("model")  # the model comes from train.init_from
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(section, f)
        base = load_recipe(f.name)
    out = a.out or exp.parent / f"{exp.name}-lr" / f"{a.start}-{a.lr:g}-w{a.warmup}"
    src = read_training_checkpoint(exp / "source")
    if a.no_moments:
        moments = None
    elif a.start == "source":
        moments = src.optimizer_state
    else:
        g = yaml.safe_load((exp / "recipe.yaml").read_text())["growth"]
        sizes = {k: g[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers", "mode", "depth")}
        _, moments = grow_optimizer_state(src.config, src.optimizer_state, **sizes)
    recipe = replace(
        base,
        optim=replace(base.optim, lr=a.lr, warmup_steps=a.warmup, schedule=a.schedule or base.optim.schedule),
        train=replace(
            base.train,
            steps=a.steps or base.train.steps,
            eval_every=a.eval_every or base.train.eval_every,
            out_dir=str(out),
            init_from=str(a.init or exp / ("grown-init" if a.start == "grown" else "source/final")),
            sample_prompts=(),
        ),
    )

    def make() -> Trainer:  # --stop ends the run early, on the schedule of train.steps
        trainer = Trainer(recipe, stop_rules=(StepLimit(a.stop),) if a.stop else ())
        if moments is not None:
            load_optimizer_state(trainer.optimizer, trainer.model, moments)
        return trainer

    run_trainer(make)
    val = {r["step"]: round(r["val_loss"], 4) for r in read_metrics(out) if "val_loss" in r}
    print(json.dumps({"start": a.start, "lr": a.lr, "warmup": a.warmup, "moments": moments is not None, "val": val}))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

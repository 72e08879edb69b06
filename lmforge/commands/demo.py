"""`lmforge demo`: the growth experiment (lmforge.experiments.growth) from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.experiments.growth import QUICK_OVERRIDES, load_growth_recipe, run_experiment
from lmforge.train.recipe import recipe_help


# ---- the command -----------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the growth experiment: train a small model, grow it, and compare with training the big one from scratch",
        description="Train a source model, grow it (function preserving), train the grown model and the same "
        "architecture from scratch with the same recipe, and report the FLOPs each needs to reach the scratch "
        "run's final validation loss. Override any recipe key as --section.key=value (growth.* included).",
    )
    p.add_argument(
        "--recipe", default=None, help=recipe_help("growth recipe (default: the embedded one)", "growth-cpu")
    )
    p.add_argument("--out", default=None, help="experiment folder (default: the recipe's train.out_dir)")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run of the pipeline (numbers mean nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier experiment in the folder")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    overrides = list(getattr(args, "overrides", None) or [])
    recipe, growth = load_growth_recipe(args.recipe, (QUICK_OVERRIDES if args.quick else []) + overrides)
    out = Path(args.out or recipe.train.out_dir)
    r = run_experiment(recipe, growth, out, args.overwrite)
    print()
    print(
        f"source {r['source_final_val_loss']:.4f} -> grown starts at {r['grown_initial_val_loss']:.4f} "
        f"(|diff| {r['init_gap']:.1e}: {'function preserved' if r['function_preserved'] else 'NOT preserved'})"
    )
    if r["saved_pct"] is None:
        print(f"the grown run never reached the scratch run's final val loss {r['scratch_final_val_loss']:.4f}")
    else:
        print(
            f"to reach val loss {r['scratch_final_val_loss']:.4f}: grown {r['grown_flops_to_target']:.3e} FLOPs, "
            f"scratch {r['scratch_flops_to_target']:.3e}: {r['saved_pct']:.1f}% saved "
            f"({r['saved_pct_with_source']:.1f}% counting the source's {r['source_flops']:.3e})"
        )
    print(f"report: {r['report']}  plot: {r['plot']}  ({r['seconds']:.0f} s)")
    keys = (
        "scratch_final_val_loss",
        "grown_flops_to_target",
        "scratch_flops_to_target",
        "saved_pct",
        "saved_pct_with_source",
        "source_final_val_loss",
        "grown_initial_val_loss",
        "function_preserved",
        "grown_final_val_loss",
        "source_flops",
        "grown_steps_to_target",
        "optimizer_state",
        "seconds",
    )
    print(json.dumps({k: r[k] for k in keys}))
    return 0

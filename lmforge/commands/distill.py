"""`lmforge distill RECIPE.yaml`: train a student against a teacher."""

from __future__ import annotations

import json

from lmforge.objectives.distill import distill_trainer, load_distill_recipe
from lmforge.train.loop import run_trainer
from lmforge.train.recipe import recipe_help


# ---- the command --------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train a student against a teacher (logit KL, hidden MSE, LM loss) until a stop condition or the budget",
        description="Distil RECIPE.yaml's student (train.init_from, or the model section from random init) from "
        "distill.teacher; override any key as --section.key=value (--distill.stop_kl=0.5). The last line printed "
        "is the run's summary as one JSON object.",
    )
    p.add_argument("recipe", help=recipe_help("recipe with a distill: section", "fuse-recover-cpu"))
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    recipe, distill = load_distill_recipe(args.recipe, args.overrides)
    trainer, summary = run_trainer(lambda: distill_trainer(recipe, distill, resume=args.resume))
    if trainer.env.is_main:
        s = summary
        print(
            f"val ppl {s['val_ppl_start']:.2f} -> {s['val_ppl']:.2f} (teacher {s['teacher_val_ppl']:.2f}, "
            f"ratio {s['ppl_ratio']:.3f}), val KL {s['val_kl_start']:.4f} -> {s['val_kl']:.4f}; "
            f"stopped by {s['stopped_by']} after {s['steps']} steps ({s['tokens']:,} tokens); run in {s['out_dir']}"
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "samples"}))
    return 0

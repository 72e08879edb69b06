"""`lmforge train RECIPE.yaml`: pre-train a language model with the one loop."""

from __future__ import annotations

from lmforge.train.loop import Trainer, run_trainer
from lmforge.train.recipe import load_recipe_sections
from lmforge.train.sharing import ShareConfig


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe (YAML), on CPU, GPU or many GPUs via torchrun",
        description="Train from RECIPE.yaml; override any key as --section.key=value. A `share` section trains "
        "groups of layers as one shared unit, then unties them when a condition holds (docs/training.md).",
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.set_defaults(func=run, accepts_overrides=True)


def load_train_recipe(path, overrides=()):
    """(recipe, {"share": ShareConfig}): the recipe sections `lmforge train` reads."""
    return load_recipe_sections(path, list(overrides), {"share": ShareConfig})


def run(args) -> int:
    recipe, extra = load_train_recipe(args.recipe, args.overrides)
    trainer, summary = run_trainer(lambda: Trainer(recipe, resume=args.resume, share=extra["share"]))
    if trainer.env.is_main:
        print(
            f"val loss {summary['val_loss_start']:.4f} -> {summary['val_loss']:.4f} "
            f"after {summary['steps']} steps ({summary['tokens']:,} tokens); run in {summary['out_dir']}"
        )
    return 0

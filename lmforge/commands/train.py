"""`lmforge train RECIPE.yaml`: pre-train a language model with the one loop."""

from __future__ import annotations

from dataclasses import asdict

from lmforge.errors import UserError
from lmforge.objectives.heldout import HeldOutConfig, HeldOutLanguageModelling
from lmforge.train.loop import Trainer, run_trainer
from lmforge.train.recipe import load_recipe_sections, recipe_help
from lmforge.train.sharing import ShareConfig


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a recipe (YAML), on CPU, GPU or many GPUs via torchrun",
        description="Train from RECIPE.yaml; override any key as --section.key=value. A `share` section trains "
        "groups of layers as one shared unit, then unties them when a condition holds; a model with held-out heads "
        "(model.heldout_layers) trains them on their own loss, weighted by a `heldout` section (docs/training.md).",
    )
    p.add_argument("recipe", help=recipe_help("recipe", "tiny-cpu"))
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.set_defaults(func=run, accepts_overrides=True)


def load_train_recipe(path, overrides=()):
    """(recipe, {"share": ShareConfig, "heldout": HeldOutConfig}): the recipe sections `lmforge train` reads."""
    return load_recipe_sections(path, list(overrides), {"share": ShareConfig, "heldout": HeldOutConfig})


def trainer_for(recipe, extra: dict, resume: bool = False) -> Trainer:
    """The trainer `lmforge train` builds from a recipe and its extra sections."""
    objective, sections = None, {}
    if recipe.model.heldout_layers:  # PSP++: the held-out heads' own loss beside the main one
        objective, sections = HeldOutLanguageModelling(extra["heldout"]), {"heldout": asdict(extra["heldout"])}
    elif extra["heldout"] != HeldOutConfig():
        raise UserError("a heldout section needs held-out heads in the model (model.heldout_layers > 0)")
    return Trainer(recipe, objective=objective, resume=resume, sections=sections, share=extra["share"])


def run(args) -> int:
    recipe, extra = load_train_recipe(args.recipe, args.overrides)
    trainer, summary = run_trainer(lambda: trainer_for(recipe, extra, resume=args.resume))
    if trainer.env.is_main:
        print(
            f"val loss {summary['val_loss_start']:.4f} -> {summary['val_loss']:.4f} "
            f"after {summary['steps']} steps ({summary['tokens']:,} tokens); run in {summary['out_dir']}"
        )
    return 0

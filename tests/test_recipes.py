"""Every shipped recipe names the command that runs it on its first line, and loads through that command's own
recipe loader into a model that builds (on the meta device: no memory, no data, no checkpoint needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.commands.finetune import load_finetune_recipe
from lmforge.commands.multitask import load_multitask_recipe
from lmforge.commands.sft import load_sft_recipe
from lmforge.commands.train import load_train_recipe
from lmforge.experiments.growth import load_growth_recipe
from lmforge.metrics.flops import flops_per_token
from lmforge.model.transformer import Transformer
from lmforge.objectives.distill import load_distill_recipe
from lmforge.surgery.grow import target_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
LOADERS = {
    "train": load_train_recipe,
    "distill": lambda path: load_distill_recipe(path),
    "demo": lambda path: load_growth_recipe(path),
    "finetune": load_finetune_recipe,
    "sft": load_sft_recipe,
    "multitask": load_multitask_recipe,
}


def test_there_are_recipes():
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_through_its_command(path):
    first = path.read_text().splitlines()[0]
    m = re.match(r"# Command: lmforge (train|distill|demo|finetune|sft|multitask) (--recipe )?recipes/(\S+)", first)
    assert m, f"{path.name}: the first line must be '# Command: lmforge <verb> ... recipes/{path.name}'"
    assert m.group(3) == path.name
    recipe, extra = LOADERS[m.group(1)](path)
    configs = [recipe.model]
    if m.group(1) == "finetune":
        assert extra["finetune"].task, f"{path.name} names no finetune.task"
    if m.group(1) == "multitask":
        assert extra["multitask"].tasks, f"{path.name} names no multitask.tasks"
    if m.group(1) == "sft":
        assert extra["sft"].data, f"{path.name} names no sft.data"
    if m.group(1) == "demo":  # the growth target too
        g = extra
        configs.append(target_config(recipe.model, **{k: v for k, v in g.sizes().items() if k != "depth"}))
    for cfg in configs:
        if recipe.train.init_from:  # the model comes from a checkpoint made by another command
            continue
        with torch.device("meta"):
            model = Transformer(cfg)
        assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
        assert flops_per_token(cfg, recipe.train.seq_len)["total"] > 0

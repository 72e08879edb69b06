"""Recipes: every key is checked, overrides apply, mistakes are one-line errors."""

import pytest

from lmforge.errors import UserError
from lmforge.train.recipe import load_recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_preset_fields_and_overrides(tmp_path):
    p = write(tmp_path, "model:\n  preset: llama-5m\n  num_layers: 2\ntrain:\n  steps: 7\n  sample_prompts: [a, b]\n")
    r = load_recipe(p, ["--train.seq_len=64", "--optim.lr=3e-4", "--model.tie_embeddings=true"])
    assert (r.model.hidden_size, r.model.num_layers, r.model.tie_embeddings) == (256, 2, True)
    assert (r.train.steps, r.train.seq_len, r.train.sample_prompts) == (7, 64, ("a", "b"))
    assert r.optim.lr == 3e-4 and isinstance(r.optim.lr, float)


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        ("train:\n  stepz: 3\n", [], "unknown recipe key train.stepz"),
        ("trian:\n  steps: 3\n", [], "unknown recipe section 'trian'"),
        ("model:\n  hidden: 3\n", [], "unknown recipe key model.hidden"),
        ("train:\n  steps: many\n", [], "train.steps expects int"),
        ("model:\n  preset: nope\n", [], "unknown model preset"),
        ("model:\n  num_heads: 3\n", [], "not divisible by num_heads"),
        ("", ["--train.steps"], "must look like --section.key=value"),
        ("", ["--steps=3"], "must name section.key"),
        ("train: [1, 2]\n", [], "must be a mapping"),
        ("model: {a: [1,\n", [], "cannot read recipe"),
    ],
)
def test_bad_recipes_are_user_errors(tmp_path, text, overrides, match):
    with pytest.raises(UserError, match=match):
        load_recipe(write(tmp_path, text), overrides)


def test_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_init_from_excludes_model_section(tmp_path):
    with pytest.raises(UserError, match="either a model section or train.init_from"):
        load_recipe(write(tmp_path, "model:\n  num_layers: 2\ntrain:\n  init_from: x\n"))

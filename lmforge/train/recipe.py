"""Training recipes: YAML files with four sections, overridable from the CLI as --section.key=value.

    model:   a preset name and/or ModelConfig fields (ignored keys are errors), or init_from
    data:    the tokenized corpus folder built by `lmforge data`
    optim:   AdamW and the learning-rate schedule
    train:   steps, batch, sequence length, evaluation, checkpoints, precision, parallelism

Every key is checked: an unknown or mistyped key is a one-line error, never silently ignored.
The resolved recipe (after overrides) is saved in every run folder as config.yaml, and the run folder is a recipe
itself: `lmforge train RUN_FOLDER --resume [--train.steps=N]` continues that run, wherever the folder now is.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError
from lmforge.model.config import PRESETS, ModelConfig


@dataclass(frozen=True)
class DataConfig:
    path: str = "runs/data/starter"  # folder with manifest.json, train/val shards (`lmforge data`)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    weight_decay: float = 0.1  # applied to matrices only, not to norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # global batch, in sequences, summed over ranks and accumulation
    micro_batch_size: int = 0  # per-rank sequences per forward; 0 = batch_size / world (no accumulation)
    seq_len: int = 256
    seed: int = 0
    eval_every: int = 100  # steps between validation losses; 0 = only at the start and the end
    eval_batches: int = 20
    eval_test: bool = False  # also log the test split's metrics (test_*) at every evaluation; never for tuning
    log_every: int = 10
    ckpt_every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2
    out_dir: str = "runs/train"
    init_from: str = ""  # start from this checkpoint (HF dir, lmforge dir or .gguf) instead of random
    precision: str = (
        "auto"  # auto (bf16 autocast on GPUs and on CPUs with native bf16; docs/training.md) | float32 | bfloat16
    )
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient (each skipped) before the run stops
    compile: str = "auto"  # auto (on for GPU) | true | false
    parallel: str = "auto"  # auto (ddp if several ranks) | ddp | fsdp | none
    device: str = "auto"  # auto | cpu | cuda
    sample_prompts: tuple[str, ...] = ("The",)  # generated from at the end of training
    sample_tokens: int = 48
    export_hf: bool = True  # write the final model in Hugging Face form to out_dir/final


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Check a YAML value against a field's annotation (int accepted for float, list for tuple)."""
    if isinstance(hint, types.UnionType) and value is None and type(None) in hint.__args__:
        return None
    base = typing.get_origin(hint) or hint
    if isinstance(hint, types.UnionType):  # e.g. int | None
        base = next(a for a in hint.__args__ if a is not type(None))
        base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if base is dict and isinstance(value, dict):
        return value
    if base in (int, float, str, bool) and (type(value) is base):
        return value
    raise UserError(f"recipe key {where} expects {getattr(base, '__name__', base)}, got {value!r}")


def build_section(section: str, cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """The dataclass `cls` from a section's YAML mapping (on top of `base` if given): an unknown key or a value
    of the wrong type is a one-line error. Commands with sections of their own (demo's growth, distill's
    distill) check them with this too."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"unknown recipe key {section}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(f"{section}.{k}", hints[k], v) for k, v in values.items()}
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise UserError(f"override {arg!r} must look like --section.key=value")
    key, raw = arg[2:].split("=", 1)
    path = key.split(".")
    if len(path) != 2:
        raise UserError(f"override {arg!r} must name section.key (e.g. --train.steps=100)")
    return path, yaml.safe_load(raw) if raw != "" else ""


PACKAGED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # shipped in the wheel: lmforge/recipes/*.yaml


def packaged_recipe_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_RECIPES.glob("*.yaml"))


def recipe_help(what: str, example: str) -> str:
    """The --help line of a command's recipe argument."""
    names = ", ".join(packaged_recipe_names())
    return (
        f"{what}: a YAML file, a run folder (with --resume), or a packaged recipe's name (e.g. {example}; all: {names})"
    )


def resolve_recipe(path: str | Path) -> Path:
    """A recipe argument as a file: the path itself when it exists, else the packaged recipe of that name (`tiny-cpu`
    or `tiny-cpu.yaml`), so a recipe runs from an installed package as from a clone."""
    given = Path(path)
    if given.exists() or given.parent != Path("."):
        return given
    packaged = PACKAGED_RECIPES / (given.name if given.suffix == ".yaml" else f"{given.name}.yaml")
    return packaged if packaged.exists() else given


def _as_recipe(sections: dict[str, dict], folder: Path, extra_sections: dict[str, type]) -> None:
    """A run folder's config.yaml (everything resolved) made a recipe for that run again, in place: the run is the
    folder given (wherever it was moved), a model from train.init_from takes its config from that checkpoint again,
    and values a command derives and records beside its own section (e.g. kd.layer_map) are derived again (the
    resumed trainer checks them against the checkpoint's)."""
    sections["train"]["out_dir"] = str(folder)
    if sections["train"].get("init_from"):
        sections["model"] = {}
    for name, cls in extra_sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        sections[name] = {k: v for k, v in sections[name].items() if k in fields}


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (or start from defaults when path is None) and apply --a.b=c overrides."""
    return load_recipe_sections(path, overrides)[0]


def load_recipe_sections(
    path: str | Path | None,
    overrides: list[str] = (),
    extra_sections: dict[str, type] | None = None,
    default_text: str | None = None,
) -> tuple[Recipe, dict[str, Any]]:
    """(recipe, {section: dataclass}): the one recipe loader. The YAML file at `path` (None: `default_text`, or the
    defaults) with --section.key=value overrides applied; a command with sections of its own beyond model / data /
    optim / train passes them as extra_sections (e.g. {"distill": DistillConfig}), checked like the others."""
    extra_sections = extra_sections or {}
    run_folder = path is not None and Path(path).is_dir()
    if run_folder and not (Path(path) / "config.yaml").is_file():
        raise UserError(f"{path} is a folder but not a run folder (no config.yaml): give a recipe YAML or a run folder")
    where = f"recipe {path}" if path is not None else "the default recipe"
    raw: dict[str, Any] = {}
    if path is not None or default_text is not None:
        try:
            if run_folder:
                text = (Path(path) / "config.yaml").read_text()
            else:
                text = resolve_recipe(path).read_text() if path is not None else default_text
            raw = yaml.safe_load(text) or {}
        except FileNotFoundError:
            names = ", ".join(packaged_recipe_names())
            raise UserError(f"recipe {path} does not exist (a file, or a packaged recipe: {names})") from None
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {where}: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{where} must be a mapping of sections")
    known = ("model", *SECTIONS, *extra_sections)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UserError(f"unknown recipe section {unknown[0]!r} (known: {', '.join(known)})")
    for k in known:
        if not isinstance(raw.get(k) or {}, dict):
            raise UserError(f"recipe section {k} must be a mapping, got {raw[k]!r}")
    sections = {k: dict(raw.get(k) or {}) for k in known}
    if run_folder:
        _as_recipe(sections, Path(path), extra_sections)
    for arg in overrides:
        (section, key), value = _parse_override(arg)
        if section not in sections:
            raise UserError(f"unknown recipe section {section!r} in {arg!r}")
        sections[section][key] = value

    model_values = sections["model"]
    if sections["train"].get("init_from") and model_values:
        raise UserError("give either a model section or train.init_from (its config comes from the checkpoint)")
    preset = model_values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r} (known: {', '.join(PRESETS)})")
    base = PRESETS[preset] if preset else ModelConfig()
    model = build_section("model", ModelConfig, model_values, base)
    recipe = Recipe(model=model, **{name: build_section(name, cls, sections[name]) for name, cls in SECTIONS.items()})
    return recipe, {name: build_section(name, cls, sections[name]) for name, cls in extra_sections.items()}

"""`lmforge demo`: the growth experiment, lmforge's main job, end to end on a laptop CPU.

    source (small) --train--> --grow (function preserving)--> grown --train N steps--+
    target (large) from scratch, same recipe, same data order --train N steps------+--> FLOPs to the scratch
                                                                                        run's final val loss

Both target runs train the same architecture for the same steps, batch, sequence length and data order (train.seed)
with the optim section's schedule; they differ only in the starting point, in `growth.grown_optim` (the optim keys
the grown run changes: the grown model is already trained, so it takes a short warm-up, and once its source has
trained to the end of its schedule a lower peak lr than a from-scratch run: docs/growth.md) and, with
growth.optimizer_state, the grown run's AdamW moments carried from the source. The source trains with
`growth.source_optim` on another data order (train.seed + 1), so the grown run does not replay it. FLOPs are
training FLOPs (6N per token plus attention, metrics/flops.py); validation passes are not counted. "FLOPs to target"
interpolates the validation curve linearly against cumulative FLOPs at the first evaluation at or below the scratch
run's final validation loss. The saving is reported without and with the source's own training FLOPs; a grown run
that never gets there has no saving (null), not a guess.

A recipe is lmforge's (model: the SOURCE, data, optim: the scratch run's, train: shared) plus a `growth:` section
(GrowthConfig below; unknown keys are errors; source_optim and grown_optim hold only the optim keys that differ for
those runs, checked as the optim section is). `lmforge demo` runs DEFAULT_RECIPE; recipes/growth-*.yaml are bigger
versions (`lmforge demo --recipe recipes/growth-cpu.yaml`); --section.key=value overrides any key.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError
from lmforge.experiments.harness import flops_to_reach
from lmforge.model.config import ModelConfig
from lmforge.train.recipe import OptimConfig, Recipe, build_section, load_recipe_sections

# The embedded default: a 2-layer, 128-wide source grown to 4 layers of 256 (2x width, 2x depth) on the starter
# corpus; about 5 minutes of training on 2 CPU cores. recipes/growth-cpu.yaml is the hour-long version.
DEFAULT_RECIPE = """
model:            # the source
  vocab_size: 4096
  hidden_size: 128
  num_layers: 2
  num_heads: 4
  ffn_size: 344
  max_seq_len: 256
data:
  path: runs/data/starter-bpe4096
optim:            # both target runs (scratch and grown); the lr grid tried is in bench/RESULTS.md
  lr: 1.5e-3
  warmup_steps: 30
train:            # shared by the three runs
  steps: 400
  batch_size: 16
  seq_len: 128
  eval_every: 20
  eval_batches: 8
  log_every: 20
  out_dir: runs/demo
  sample_prompts: ["KING HENRY:", "The government said"]
  sample_tokens: 24
growth:
  hidden: 256
  layers: 4
  source_steps: 400
  noise_snr_db: 10.0
  source_optim: {lr: 3.0e-3}        # the small source takes a higher learning rate
  grown_optim: {warmup_steps: 10}   # the grown model is trained already: a short warm-up
  optimizer_state: true             # and it continues from the source's AdamW moments
"""
# --quick: a smoke run of the whole pipeline in about a minute; its numbers mean nothing.
QUICK_OVERRIDES = ["--train.steps=30", "--growth.source_steps=30", "--train.eval_every=10", "--train.eval_batches=2"]
RUNS = ("source", "grown-init", "grown", "scratch")  # sub-folders of the experiment folder
OUTPUTS = ("report.md", "result.json", "recipe.yaml", "loss_vs_flops.png", "loss_vs_flops_with_source.png")
INIT_TOLERANCE = 1e-4  # |grown initial val loss - source final val loss| allowed for "function preserved"


@dataclass(frozen=True)
class GrowthConfig:
    """The `growth:` section. Sizes left null follow lmforge.surgery.grow.target_config (FFN and heads scale with
    the hidden size, head_dim fixed)."""

    hidden: int | None = None  # target sizes
    ffn: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    layers: int | None = None
    mode: str = "clone"  # clone | zero
    depth: str = "interleave"  # interleave | top | bottom | stack (G_stack: not function preserving)
    noise_snr_db: float | None = 10.0  # symmetry-breaking noise (clone); null: none
    noise: str = "cancel"  # cancel (outputs unchanged) | plain
    seed: int = 0  # seed of growth's random parts
    source_steps: int = 0  # steps of the source run; 0: train.steps
    source_optim: dict = field(default_factory=dict)  # optim keys that differ for the source run
    grown_optim: dict = field(default_factory=dict)  # optim keys that differ for the grown run (e.g. warmup_steps)
    optimizer_state: bool = False  # start the grown run from the source's AdamW moments (surgery/grow_optim.py)
    starter_tokenizer: str = "bpe:4096"  # build the starter corpus at data.path if missing; "": never

    def sizes(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("hidden", "ffn", "heads", "kv_heads", "layers", "mode", "depth")}


def _check_growth(g: GrowthConfig) -> GrowthConfig:
    """The growth section's own rules, after build_section checked its keys and types."""
    optims = {}
    for key in ("source_optim", "grown_optim"):  # checked and typed as the optim section is
        given = getattr(g, key)
        try:
            checked = build_section("optim", OptimConfig, given)
        except UserError as e:
            raise UserError(f"growth.{key}: {e}") from None
        optims[key] = {k: getattr(checked, k) for k in given}
    if g.source_steps < 0:
        raise UserError(f"growth.source_steps must be >= 0, got {g.source_steps}")
    return replace(g, **optims)


def load_growth_recipe(path: str | Path | None, overrides: list[str] = ()) -> tuple[Recipe, GrowthConfig]:
    """(recipe of the source run, growth section) from a YAML file (None: DEFAULT_RECIPE) and --a.b=c overrides."""
    recipe, extra = load_recipe_sections(path, overrides, {"growth": GrowthConfig}, default_text=DEFAULT_RECIPE)
    return recipe, _check_growth(extra["growth"])


# ---- the experiment --------------------------------------------------------------------------------------------
def _val_points(rows: list[dict], x: str = "flops", metric: str = "val_loss") -> list[tuple[float, float]]:
    return [(r[x], r[metric]) for r in rows if r.get(metric) is not None and r.get(x) is not None]


def ensure_data(recipe: Recipe, growth: GrowthConfig) -> Path:
    """The tokenized corpus at data.path; the starter corpus is built there first if it is missing."""
    path = Path(recipe.data.path)
    if (path / "manifest.json").exists():
        return path
    if not growth.starter_tokenizer:
        raise UserError(f"data.path {path} holds no dataset (build one with `lmforge data`)")
    from lmforge.data.tokens import build_dataset

    print(f"building the starter corpus ({growth.starter_tokenizer}) into {path} ...", flush=True)
    build_dataset(path, starter=True, tokenizer=growth.starter_tokenizer, val_fraction=0.05, seed=0)
    return path


def _prepare_out(out: Path, overwrite: bool) -> None:
    ours = [out / n for n in (*RUNS, *OUTPUTS) if (out / n).exists()]
    if ours and not overwrite:
        raise UserError(f"{out} already holds an experiment (pass --overwrite to replace it, or --out elsewhere)")
    for p in ours:  # only what the demo writes: --out may hold other things
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _copy_divergence(init_dir: Path, final_dir: Path, d_s: int, d_t: int) -> dict[str, float] | None:
    """How far the first two copies of the source's residual dims in the embedding have moved apart, relative
    to their size (0 means the symmetry was never broken and the wider model gained no capacity)."""
    if d_t < 2 * d_s or not final_dir.is_dir():
        return None
    from lmforge.io.checkpoints import load

    out = {}
    for label, folder in (("start", init_dir), ("end", final_dir)):
        e = load(folder).embed.tok.weight.detach()  # (V, d_t)
        out[label] = float((e[:, :d_s] - e[:, d_s : 2 * d_s]).norm() / e[:, :d_s].norm())
    return out


def _train(recipe: Recipe, moments: dict | None = None) -> dict:
    from lmforge.surgery.grow_optim import load_optimizer_state
    from lmforge.train.loop import Trainer, run_trainer

    def make() -> Trainer:
        trainer = Trainer(recipe)
        if moments is not None:
            n = load_optimizer_state(trainer.optimizer, trainer.model, moments)
            print(f"carried the source's AdamW state into {n} grown parameters", flush=True)
        return trainer

    t0 = time.perf_counter()
    trainer, summary = run_trainer(make)
    return {**summary, "seconds": time.perf_counter() - t0, "params": trainer.model.num_params()}


def check_growth(recipe: Recipe, growth: GrowthConfig) -> tuple[ModelConfig, ModelConfig, dict]:
    """(source config, target config, grow() keywords); a growth that grows nothing or has bad options is a
    UserError, raised before anything is trained or written."""
    from lmforge.surgery.grow import grow, target_config

    if recipe.train.init_from:
        raise UserError("train.init_from has no place in a growth recipe: the model section is the source")
    cfg_s = recipe.model
    grow_kw = dict(**growth.sizes(), noise_snr_db=growth.noise_snr_db, noise=growth.noise, seed=growth.seed)
    cfg_t = target_config(cfg_s, **{k: v for k, v in growth.sizes().items() if k != "depth"})
    if cfg_t == cfg_s:
        raise UserError("the growth section grows nothing: give a larger hidden, ffn, heads, kv_heads or layers")
    grow(cfg_s, iter(()), **grow_kw)  # checks the options
    return cfg_s, cfg_t, grow_kw


def run_recipes(recipe: Recipe, growth: GrowthConfig, cfg_t: ModelConfig, out: Path) -> dict[str, Recipe]:
    """The recipes of the three runs, each in its sub-folder of `out` (the grown run starts from out/grown-init)."""
    tc = recipe.train
    return {
        "source": replace(
            recipe,
            optim=replace(recipe.optim, **growth.source_optim),
            train=replace(tc, steps=growth.source_steps or tc.steps, seed=tc.seed + 1, out_dir=str(out / "source")),
        ),
        "grown": replace(
            recipe,
            optim=replace(recipe.optim, **growth.grown_optim),
            train=replace(tc, out_dir=str(out / "grown"), init_from=str(out / "grown-init")),
        ),
        "scratch": replace(recipe, model=cfg_t, train=replace(tc, out_dir=str(out / "scratch"))),
    }


def grow_source(source_run: Path, growth: GrowthConfig, grow_kw: dict, data: Path, dest: Path) -> dict | None:
    """Grow the final checkpoint of the source run into `dest` (lmforge form, with the data's tokenizer); returns
    the grown AdamW moments when growth.optimizer_state, else None."""
    from lmforge.data.tokens import TokenDataset
    from lmforge.io.checkpoints import save_lmforge
    from lmforge.surgery.grow import exactness, grow
    from lmforge.surgery.grow_optim import (
        OPTIMIZER_STATE_FILE,
        grow_optimizer_state,
        optimizer_state_bytes,
        read_training_checkpoint,
    )

    src = read_training_checkpoint(source_run)
    cfg_g, tensors = grow(src.config, src.model_state, **grow_kw)
    side = TokenDataset(data, "train").tokenizer_files
    moments = None
    if growth.optimizer_state:
        _, moments = grow_optimizer_state(src.config, src.optimizer_state, **growth.sizes())
        side = {**side, OPTIMIZER_STATE_FILE: optimizer_state_bytes(moments, src.step)}
    save_lmforge(cfg_g, tensors, dest, side)
    noise = growth.noise if growth.noise_snr_db is not None else None
    dtype = next(iter(src.model_state.values())).dtype  # what the grown tensors are stored in
    print(f"grown model in {dest}: {exactness(src.config, cfg_g, growth.mode, growth.depth, noise, dtype)}")
    return moments


def run_experiment(recipe: Recipe, growth: GrowthConfig, out: Path, overwrite: bool = False) -> dict:
    """Source, growth, grown and scratch runs in `out`; writes report.md, result.json and two plots. Returns the
    result (see the module docstring for what is counted)."""
    from lmforge.data.tokens import TokenDataset, check_tokenizer_matches
    from lmforge.metrics.flops import flops_per_token
    from lmforge.metrics.report import read_metrics

    t_start = time.perf_counter()
    tc = recipe.train
    cfg_s, cfg_t, grow_kw = check_growth(recipe, growth)
    data = ensure_data(recipe, growth)
    check_tokenizer_matches(TokenDataset(data, "train").manifest, cfg_s.vocab_size)  # before anything is written
    _prepare_out(out, overwrite)
    (out / "recipe.yaml").write_text(
        yaml.safe_dump({**recipe.to_dict(), "growth": dataclasses.asdict(growth)}, sort_keys=False)
    )
    recipes = run_recipes(recipe, growth, cfg_t, out)

    def banner(text: str) -> None:
        print(f"\n== {text} ==", flush=True)

    banner(f"1/4 source: {cfg_s.num_layers} x {cfg_s.hidden_size}, {recipes['source'].train.steps} steps")
    summaries = {"source": _train(recipes["source"])}

    banner(f"2/4 grow: {cfg_s.num_layers} x {cfg_s.hidden_size} -> {cfg_t.num_layers} x {cfg_t.hidden_size}")
    moments = grow_source(out / "source", growth, grow_kw, data, out / "grown-init")

    banner(f"3/4 grown: {cfg_t.num_layers} x {cfg_t.hidden_size} from the source, {tc.steps} steps")
    summaries["grown"] = _train(recipes["grown"], moments)
    banner(f"4/4 scratch: {cfg_t.num_layers} x {cfg_t.hidden_size} from random weights, {tc.steps} steps")
    summaries["scratch"] = _train(recipes["scratch"])

    rows = {name: read_metrics(out / name) for name in ("source", "grown", "scratch")}
    result = analyse(rows, summaries, growth)
    result["copy_divergence"] = _copy_divergence(
        out / "grown-init", out / "grown" / "final", cfg_s.hidden_size, cfg_t.hidden_size
    )
    result["flops_per_token"] = {
        "source": flops_per_token(cfg_s, tc.seq_len)["total"],
        "target": flops_per_token(cfg_t, tc.seq_len)["total"],
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    plots = _plots(rows, result, out, cfg_s, cfg_t)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(_report(result, summaries, recipe, growth, cfg_s, cfg_t, plots))
    return {**result, "report": str(out / "report.md"), "plot": str(plots[0])}


def analyse(rows: dict[str, list[dict]], summaries: dict[str, dict], growth: GrowthConfig) -> dict:
    """The numbers of the experiment from the three runs' metrics rows."""
    target = summaries["scratch"]["val_loss"]
    src_flops = summaries["source"]["flops"]
    to_target = {name: flops_to_reach(_val_points(rows[name]), target) for name in ("grown", "scratch")}
    steps_to = {name: flops_to_reach(_val_points(rows[name], "step"), target) for name in ("grown", "scratch")}
    g, s = to_target["grown"], to_target["scratch"]
    saved = 100 * (1 - g / s) if g is not None and s else None
    saved_src = 100 * (1 - (g + src_flops) / s) if g is not None and s else None
    init_gap = abs(summaries["grown"]["val_loss_start"] - summaries["source"]["val_loss"])
    return {
        "scratch_final_val_loss": target,
        "grown_flops_to_target": g,
        "scratch_flops_to_target": s,
        "saved_pct": None if saved is None else round(saved, 2),
        "saved_pct_with_source": None if saved_src is None else round(saved_src, 2),
        "grown_steps_to_target": None if steps_to["grown"] is None else round(steps_to["grown"], 1),
        "scratch_steps_to_target": None if steps_to["scratch"] is None else round(steps_to["scratch"], 1),
        "source_final_val_loss": summaries["source"]["val_loss"],
        "grown_initial_val_loss": summaries["grown"]["val_loss_start"],
        "init_gap": init_gap,
        "function_preserved": init_gap <= INIT_TOLERANCE,
        "grown_final_val_loss": summaries["grown"]["val_loss"],
        "scratch_initial_val_loss": summaries["scratch"]["val_loss_start"],
        "source_flops": src_flops,
        "grown_flops": summaries["grown"]["flops"],
        "scratch_flops": summaries["scratch"]["flops"],
        "source_params": summaries["source"]["params"],
        "target_params": summaries["scratch"]["params"],
        "steps": summaries["scratch"]["steps"],
        "source_steps": summaries["source"]["steps"],
        "optimizer_state": growth.optimizer_state,
        "run_seconds": {name: round(s["seconds"], 1) for name, s in summaries.items()},
    }


def _plots(rows: dict, result: dict, out: Path, cfg_s, cfg_t) -> list[Path]:
    from lmforge.metrics.report import plot_curves

    shift = result["source_flops"]
    shifted = [{**r, "flops": r["flops"] + shift} if r.get("flops") is not None else r for r in rows["grown"]]
    src = f"source {cfg_s.num_layers}x{cfg_s.hidden_size}"
    tgt = f"{cfg_t.num_layers}x{cfg_t.hidden_size}"
    target = result["scratch_final_val_loss"]
    return [
        plot_curves(
            {f"grown {tgt}": rows["grown"], f"scratch {tgt}": rows["scratch"], src: rows["source"]},
            out / "loss_vs_flops.png",
            title="growth vs scratch (the grown run's FLOPs without the source's)",
            hline=target,
        ),
        plot_curves(
            {f"grown {tgt} (after the source)": shifted, f"scratch {tgt}": rows["scratch"], src: rows["source"]},
            out / "loss_vs_flops_with_source.png",
            title="growth vs scratch, counting the source's training FLOPs",
            hline=target,
        ),
    ]


def _fmt_flops(x: float | None) -> str:
    return "never reached" if x is None else f"{x:.3e}"


def _schedule_text(optim: dict) -> str:
    """'lr 0.003, warm-up 100 steps, then cosine to 0.1 x lr' for an optim section as a dict."""
    decay = "constant" if optim["schedule"] == "constant" else f"{optim['schedule']} to {optim['min_lr_ratio']:g} x lr"
    return f"lr {optim['lr']:g}, warm-up {optim['warmup_steps']} steps, then {decay}"


def _report(result, summaries, recipe, growth, cfg_s, cfg_t, plots) -> str:
    from lmforge.metrics.report import markdown_table

    r = result
    tc = recipe.train
    grown_optim = {**dataclasses.asdict(recipe.optim), **growth.grown_optim}
    source_optim = {**dataclasses.asdict(recipe.optim), **growth.source_optim}

    def arch(c) -> str:
        return f"{c.num_layers} layers x {c.hidden_size} (FFN {c.ffn_size}, {c.num_heads} heads)"

    table = markdown_table(
        ["run", "parameters", "steps", "training FLOPs", "val loss start -> end", "FLOPs to target"],
        [
            ["source " + arch(cfg_s), r["source_params"], r["source_steps"], _fmt_flops(r["source_flops"]),
             f"{summaries['source']['val_loss_start']:.4f} -> {r['source_final_val_loss']:.4f}", "-"],
            ["grown " + arch(cfg_t), r["target_params"], r["steps"], _fmt_flops(r["grown_flops"]),
             f"{r['grown_initial_val_loss']:.4f} -> {r['grown_final_val_loss']:.4f}",
             _fmt_flops(r["grown_flops_to_target"])],
            ["scratch " + arch(cfg_t), r["target_params"], r["steps"], _fmt_flops(r["scratch_flops"]),
             f"{r['scratch_initial_val_loss']:.4f} -> {r['scratch_final_val_loss']:.4f}",
             _fmt_flops(r["scratch_flops_to_target"])],
        ],
    )  # fmt: skip
    if r["saved_pct"] is None:
        verdict = (
            f"The grown model did **not** reach the scratch run's final validation loss "
            f"{r['scratch_final_val_loss']:.4f} within {r['steps']} steps: no saving is claimed."
        )
    else:
        verdict = (
            f"The grown model reached the scratch run's final validation loss {r['scratch_final_val_loss']:.4f} "
            f"with **{100 - r['saved_pct']:.1f}%** of the scratch run's training FLOPs "
            f"(step {r['grown_steps_to_target']} of {r['steps']}): **{r['saved_pct']:.1f}% saved**, "
            f"or **{r['saved_pct_with_source']:.1f}%** counting the source's training as well."
        )
    div = r.get("copy_divergence")
    lines = [
        "# lmforge demo: growth",
        "",
        verdict,
        "",
        table,
        "",
        f"Function preserved by growth: the grown model's first validation loss is {r['grown_initial_val_loss']:.6f}, "
        f"the source's last {r['source_final_val_loss']:.6f} (|difference| {r['init_gap']:.2e}, "
        f"{'within' if r['function_preserved'] else 'NOT within'} {INIT_TOLERANCE:g}).",
        "",
        f"![loss vs FLOPs]({plots[0].name})",
        "",
        f"![loss vs FLOPs, counting the source]({plots[1].name})",
        "",
        "## What was run and what is counted",
        "",
        f"- Growth: mode {growth.mode}, depth {growth.depth}, noise "
        + (f"{growth.noise} at {growth.noise_snr_db:g} dB" if growth.noise_snr_db is not None else "none")
        + f"; AdamW moments carried from the source: {'yes' if growth.optimizer_state else 'no (fresh AdamW)'}.",
        f"- Shared: {tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens for both target runs, the same data "
        f"order (seed {tc.seed}); the source trained {r['source_steps']} steps on another order (seed {tc.seed + 1}).",
        f"- AdamW: scratch {_schedule_text(dataclasses.asdict(recipe.optim))}; grown {_schedule_text(grown_optim)} "
        f"(it starts trained); source {_schedule_text(source_optim)}.",
        "- FLOPs: training only (6 x matmul parameters + attention, per token; lmforge.metrics.flops_per_token); "
        f"{r['flops_per_token']['source']:.3g} per token for the source, {r['flops_per_token']['target']:.3g} for "
        "the target. Validation passes are not counted. FLOPs to target: the first evaluation at or below the "
        "target, interpolated linearly from the one before.",
        f"- Symmetry: the embedding's first two copies differ by {div['start']:.2e} (relative) at the start and "
        f"{div['end']:.2e} at the end of the grown run."
        if div
        else "- Symmetry: no duplicated residual copies.",
        f"- Wall clock: {r['seconds']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["run_seconds"].items())
        + "); the FLOPs, not the seconds, are the comparison.",
        "",
        "Run folders: `source/`, `grown-init/` (the grown checkpoint), `grown/`, `scratch/` (each with "
        "metrics.jsonl, config.yaml, run.json, final/); `result.json` holds every number above.",
    ]
    samples = [(k, s) for k in ("grown", "scratch") for s in summaries[k]["samples"]]
    if samples:
        lines += ["", "## Samples", "", *[f"- {k}: `{s!r}`" for k, s in samples]]
    return "\n".join(lines) + "\n"

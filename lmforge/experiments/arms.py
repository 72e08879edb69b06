"""Arms against a baseline arm, by the protocol of harness.py: the shared skeleton of the method benchmarks.

    tuning, claim, tune_rows = tune_then_claim(train, arms, grid, seeds, tune_seed)
    verdicts = against_baseline(claim, "ordinary")

`train(arm, lr, seed, test)` trains one run and returns its row (at least val_loss, test_loss when test, flops and
out_dir, the run folder whose metrics.jsonl holds the test curve). Each arm's lr is searched on validation with
`tune_seed` (lr_search widens the grid until the best is inside); then every arm runs at its tuned lr for each seed,
with the test split scored at every evaluation. The verdict of an arm: the training FLOPs its test curve needs to
reach the baseline run's final test loss, as a fraction of the baseline run's FLOPs (FLOPs count every matmul the
arm runs, so an arm that costs more per token pays for it), and its final test loss against the baseline's (paired
by seed, with a bootstrap interval).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmforge.experiments.harness import (
    flops_to_reach,
    lr_search,
    paired_bootstrap,
    spread,
    write_claim_result,
)
from lmforge.metrics.report import markdown_table, plot_curves, read_metrics

Train = Callable[[str, float, int, bool], dict[str, Any]]


def train_run(recipe: Path, overrides: list[str], arm: str, lr: float, seed: int, out: Path, test: bool) -> dict:
    """One `lmforge train` run in this process (recipe + overrides at this lr and seed, into `out`): its row."""
    from lmforge.commands.train import load_train_recipe, trainer_for
    from lmforge.train.loop import run_trainer

    run = [f"--optim.lr={lr}", f"--train.seed={seed}", f"--train.out_dir={out}", "--train.sample_prompts=[]"]
    run += [f"--train.eval_test={'true' if test else 'false'}", "--train.export_hf=false"]
    recipe_, extra = load_train_recipe(recipe, [*overrides, *run])
    t0 = time.perf_counter()
    _, summary = run_trainer(lambda: trainer_for(recipe_, extra))
    events = [{k: r[k] for k in ("step", "event", "reason") if k in r} for r in read_metrics(out) if "event" in r]
    return {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "val_loss": summary["val_loss"],
        "test_loss": summary.get("test_loss"),
        "tokens": summary["tokens"],
        "flops": summary["flops"],
        "seconds": round(time.perf_counter() - t0, 1),
        "events": events,
        "out_dir": str(out),
    }


def tune_then_claim(
    train: Train, arms: Sequence[str], grid: Sequence[float], seeds: Sequence[int], tune_seed: int
) -> tuple[dict, dict[str, list[dict]], list[dict]]:
    """(each arm's lr search, each arm's claim rows in seed order, every tuning row)."""
    tuning, tune_rows = {}, []
    for arm in arms:

        def score(lr: float, arm: str = arm) -> float:
            row = train(arm, lr, tune_seed, False)
            tune_rows.append(row)
            print(json.dumps(row), flush=True)
            return row["val_loss"]

        tuning[arm] = lr_search(score, grid)
        print(f"# {arm}: best lr {tuning[arm]['best']:g} of {tuning[arm]['scores']}", flush=True)
    claim: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            row = train(arm, tuning[arm]["best"], seed, True)
            claim[arm].append(row)
            print(json.dumps(row), flush=True)
    return tuning, claim, tune_rows


def against_baseline(claim: dict[str, list[dict]], baseline: str, metric: str = "test_loss") -> dict[str, dict]:
    verdicts = {}
    for arm, rows in claim.items():
        fractions = []
        for row, base in zip(rows, claim[baseline]):
            points = [(r["flops"], r[metric]) for r in read_metrics(row["out_dir"]) if r.get(metric) is not None]
            need = flops_to_reach(points, base[metric])
            fractions.append(need / base["flops"] if need is not None else math.nan)
        reached = [not math.isnan(f) for f in fractions]
        values, base_values = [r[metric] for r in rows], [r[metric] for r in claim[baseline]]
        verdicts[arm] = {
            "flops_fraction_to_reach_baseline": spread(fractions) if all(reached) else None,
            "fractions": fractions,
            "reached": reached,
            metric: spread(values),
            f"{metric}_minus_baseline": paired_bootstrap(values, base_values),
            "seconds": spread([r["seconds"] for r in rows]),
        }
    return verdicts


def verdict_table(verdicts: dict, tuning: dict, column: tuple[str, dict[str, str]] | None = None) -> str:
    """The markdown table of against_baseline's verdicts (and one more column per arm, if given)."""
    rows = []
    for arm, v in verdicts.items():
        f, d, loss = v["flops_fraction_to_reach_baseline"], v["test_loss_minus_baseline"], v["test_loss"]
        frac = (
            f"{f['mean']:.3f} (sd {f['std']:.3f})"
            if f
            else "not reached: " + ", ".join(f"{x:.3f}" for x in v["fractions"])
        )
        row = [arm, f"{tuning[arm]['best']:g}", frac, f"{loss['mean']:.4f} (sd {loss['std']:.4f})"]
        row.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        rows.append(row + ([column[1][arm]] if column else []))
    header = ["arm", "tuned lr", "FLOPs to the baseline's test loss", "final test loss", "- baseline [95% CI]"]
    return markdown_table(header + ([column[0]] if column else []), rows) + "\n"


def summary_line(verdicts: dict) -> dict:
    """Each arm's mean FLOPs fraction (None unless every seed reached the baseline) and mean test-loss difference."""
    return {
        arm: {
            "flops_fraction": (v["flops_fraction_to_reach_baseline"] or {}).get("mean"),
            "test_minus_baseline": round(v["test_loss_minus_baseline"]["mean"], 4),
        }
        for arm, v in verdicts.items()
    }


def bench_main(
    doc: str,
    recipe: Path,
    arms: dict[str, list[str]],
    argv: list[str] | None,
    work: Path,
    title: str,
    column: Callable[[dict, dict], tuple[str, dict[str, str]]] | None = None,
) -> dict:
    """The command line of a method benchmark: `arms` (name -> recipe overrides, the first the baseline) tuned and
    claimed with tune_then_claim, judged with against_baseline; writes OUT/result.json, OUT/report.md (the verdict
    table, plus column(verdicts, claim) if given) and OUT/loss_vs_flops.png (the first seed's test curves)."""
    names = list(arms)
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default="runs/data/starter3-bpe4096", help="a token dataset with a test split")
    p.add_argument("--arms", default=",".join(names), help=f"comma-separated, {names[0]} among them")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3", help="each arm's lr grid (widened as needed)")
    p.add_argument("--steps", type=int, help="training steps of every run (default: the recipe's)")
    p.add_argument("--work", type=Path, default=work)
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value, every run")
    a = p.parse_args(argv)
    chosen, seeds = a.arms.split(","), [int(s) for s in a.seeds.split(",")]
    if names[0] not in chosen or set(chosen) - set(names) or a.tune_seed in seeds:
        p.error(f"--arms: {names[0]} and others of {', '.join(names)}; --tune-seed not among --seeds")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    common = [f"--data.path={a.data}", *([f"--train.steps={a.steps}"] if a.steps else []), *(f"--{kv}" for kv in a.set)]
    t_start = time.perf_counter()

    def train(arm: str, lr: float, seed: int, test: bool) -> dict:
        out = a.work / ("claim" if test else "tune") / arm / (f"seed{seed}" if test else f"lr{lr:g}")
        return train_run(recipe, [*arms[arm], *common], arm, lr, seed, out, test)

    tuning, claim, tune_rows = tune_then_claim(train, chosen, [float(x) for x in a.lrs.split(",")], seeds, a.tune_seed)
    verdicts = against_baseline(claim, names[0])
    a.out.mkdir(parents=True, exist_ok=True)
    curves = {arm: read_metrics(claim[arm][0]["out_dir"]) for arm in chosen}
    plot_curves(curves, a.out / "loss_vs_flops.png", title=f"{title}, seed {seeds[0]}", val_key="test_loss")
    setup = {"recipe": recipe.name, "steps": a.steps, "arms": {k: arms[k] for k in chosen}}
    result = write_claim_result(a.out / "result.json", argv, setup, tuning, verdicts, claim, tune_rows, t_start)
    table = verdict_table(verdicts, tuning, column(verdicts, claim) if column else None)
    (a.out / "report.md").write_text(f"# {title} ({result['provenance']['date']})\n\n{table}")
    print(json.dumps(summary_line(verdicts)))
    return result

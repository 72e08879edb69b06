"""The growth experiment measured by the protocol of lmforge/experiments/harness.py: tuned baselines, seeds, test split.

    python bench/growth.py --out bench/results/growth-demo [--recipe recipes/growth-cpu.yaml] [--seeds 0,1,2]
                           [--scratch-lrs 1.5e-3,3e-3,6e-3] [--grown-lrs 7.5e-4,1.5e-3,3e-3] [--work runs/bench-growth]
                           [--set section.key=value ...]

1. Tuning, on validation only, with its own seed (--tune-seed, used by no claim run): the scratch run's peak lr and
   the grown run's peak lr are each searched on a grid that is widened until the best lies inside it; the score is
   the run's final validation loss. The source is trained once for the grown runs to start from.
2. Claim, on the test split, for each seed: the whole experiment (source, growth, grown run, scratch run) with the
   tuned lrs and train.eval_test on; the target is the scratch run's final TEST loss, and the saving is read from
   the test curves. Headline: the FLOPs saved counting the source's training, mean over seeds with its spread and a
   bootstrap interval; also without the source, and in wall-clock seconds (source, growth and evaluation included).

Writes OUT/result.json (every number, the tuning scores, provenance) and OUT/report.md; the run folders go to --work.
The last line printed is the summary as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.errors import UserError  # noqa: E402
from lmforge.experiments.growth import (  # noqa: E402
    _train,
    _val_points,
    check_growth,
    ensure_data,
    flops_to_reach,
    grow_source,
    load_growth_recipe,
    run_experiment,
    run_recipes,
)
from lmforge.experiments.harness import Stages, lr_search, paired_bootstrap, provenance, spread, write_result  # noqa: E402
from lmforge.metrics.report import markdown_table, read_metrics  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def tune(recipe, growth, work: Path, seed: int, grids: dict, stages: Stages) -> dict:
    """lr searches on validation for the scratch run and for the grown run (from one source trained at `seed`),
    then, at each arm's best lr, its warm-up among grids[arm + "_warmups"] (the recipe's own included)."""
    tc = replace(recipe.train, seed=seed, eval_test=False)
    recipe = replace(recipe, train=tc)
    growth = replace(growth, seed=seed)
    cfg_s, cfg_t, grow_kw = check_growth(recipe, growth)
    data = ensure_data(recipe, growth)
    base = run_recipes(recipe, growth, cfg_t, work)
    moments = None

    def score(arm: str, lr: float, warmup: int) -> float:
        r = base[arm]
        r = replace(r, optim=replace(r.optim, lr=lr, warmup_steps=warmup))
        r = replace(r, train=replace(r.train, out_dir=str(work / f"{arm}-lr{lr:g}-w{warmup}")))
        # AdamW updates the moments it is given in place: each grown run gets its own copy.
        fresh = None if moments is None else {n: {k: v.clone() for k, v in m.items()} for n, m in moments.items()}
        t0 = time.perf_counter()
        s = _train(r, fresh if arm == "grown" else None)
        stages.add(f"tune {arm} lr {lr:g} warmup {warmup}", time.perf_counter() - t0, s["flops"])
        return s["val_loss"]

    found = {}
    for arm in ("scratch", "grown"):
        if arm == "grown":
            t0 = time.perf_counter()
            s = _train(base["source"])
            stages.add("tune source", time.perf_counter() - t0, s["flops"])
            with stages.timed("tune growth"):
                moments = grow_source(work / "source", growth, grow_kw, data, work / "grown-init")
        w0 = base[arm].optim.warmup_steps
        lrs = lr_search(lambda lr, arm=arm, w0=w0: score(arm, lr, w0), grids[arm])
        warmups = {w0: lrs["scores"][f"{lrs['best']:g}"]}
        for w in grids[arm + "_warmups"]:
            if w not in warmups:
                warmups[w] = score(arm, lrs["best"], w)
        best_w = min(warmups, key=warmups.get)
        found[arm] = {**lrs, "warmup_scores": {str(w): v for w, v in sorted(warmups.items())}, "best_warmup": best_w}
    return {"seed": seed, **found}


def claim(recipe, growth, work: Path, seed: int, tuned: dict) -> dict:
    """One seed of the experiment with the tuned lrs and warm-ups; its numbers on the test split."""
    s, g = tuned["scratch"], tuned["grown"]
    optim = replace(recipe.optim, lr=s["lr"], warmup_steps=s["warmup"])
    recipe = replace(recipe, optim=optim, train=replace(recipe.train, seed=seed, eval_test=True))
    growth = replace(growth, seed=seed, grown_optim={**growth.grown_optim, "lr": g["lr"], "warmup_steps": g["warmup"]})
    out = work / f"seed{seed}"
    result = run_experiment(recipe, growth, out, overwrite=True)
    rows = {name: read_metrics(out / name) for name in ("source", "grown", "scratch")}
    target = [r["test_loss"] for r in rows["scratch"] if r.get("test_loss") is not None][-1]
    g = flops_to_reach(_val_points(rows["grown"], "flops", "test_loss"), target)
    s = flops_to_reach(_val_points(rows["scratch"], "flops", "test_loss"), target)
    g_steps = flops_to_reach(_val_points(rows["grown"], "step", "test_loss"), target)
    s_steps = flops_to_reach(_val_points(rows["scratch"], "step", "test_loss"), target)
    src_flops, steps, secs = result["source_flops"], result["steps"], result["run_seconds"]
    grow_seconds = result["seconds"] - sum(secs.values())  # surgery, saving, the report: charged to growth
    out_numbers = {
        "seed": seed,
        "scratch_final_test_loss": target,
        "grown_final_test_loss": [r["test_loss"] for r in rows["grown"] if r.get("test_loss") is not None][-1],
        "grown_flops_to_target": g,
        "scratch_flops_to_target": s,
        "source_flops": src_flops,
        "grown_steps_to_target": g_steps,
        "scratch_steps_to_target": s_steps,
        "function_preserved": result["function_preserved"],
        "run_seconds": secs,
        "other_seconds": round(grow_seconds, 1),
        "val_saved_pct_with_source": result["saved_pct_with_source"],
    }
    if g is None:  # never reached the target: no saving is claimed
        return {**out_numbers, "saved_pct": None, "saved_pct_with_source": None, "wall_saved_pct_with_source": None}
    grown_wall = secs["source"] + grow_seconds + secs["grown"] * g_steps / steps
    scratch_wall = secs["scratch"] * s_steps / steps
    return {
        **out_numbers,
        "saved_pct": 100 * (1 - g / s),
        "saved_pct_with_source": 100 * (1 - (g + src_flops) / s),
        "wall_saved_pct_with_source": 100 * (1 - grown_wall / scratch_wall),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="where result.json and report.md go (commit them)")
    p.add_argument("--recipe", default=None, help="growth recipe (default: the embedded one of `lmforge demo`)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-growth", help="run folders")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--scratch-lrs", type=floats, default=floats("1.5e-3,3e-3,6e-3"))
    p.add_argument("--grown-lrs", type=floats, default=floats("7.5e-4,1.5e-3,3e-3"))
    p.add_argument("--scratch-warmups", default="15,60", help="warm-ups tried at the best lr, beside the recipe's")
    p.add_argument("--grown-warmups", default="5,20", help="the same for the grown run")
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.tune_seed in seeds:
        p.error("--tune-seed must differ from every claim seed")
    recipe, growth = load_growth_recipe(a.recipe, [f"--{kv}" for kv in a.set])
    if (a.out / "result.json").exists():
        raise UserError(f"{a.out / 'result.json'} exists: choose another --out")
    stages, t0 = Stages(), time.perf_counter()
    grids = {
        "scratch": a.scratch_lrs,
        "grown": a.grown_lrs,
        "scratch_warmups": [int(w) for w in a.scratch_warmups.split(",") if w],
        "grown_warmups": [int(w) for w in a.grown_warmups.split(",") if w],
    }
    tuning = tune(recipe, growth, a.work / "tune", a.tune_seed, grids, stages)
    tuned = {arm: {"lr": tuning[arm]["best"], "warmup": tuning[arm]["best_warmup"]} for arm in ("scratch", "grown")}
    claims = []
    for seed in seeds:
        with stages.timed(f"claim seed {seed}"):
            claims.append(claim(recipe, growth, a.work / "claims", seed, tuned))
    reached = [c for c in claims if c["saved_pct_with_source"] is not None]
    keys = ("saved_pct_with_source", "saved_pct", "wall_saved_pct_with_source")
    summary = {k: spread([c[k] for c in reached]) for k in keys} if reached else {}
    for k in keys:
        if len(reached) == len(claims):
            summary[k]["bootstrap_95"] = paired_bootstrap([c[k] for c in claims], [0.0] * len(claims))
    summary["final_test_loss_grown_minus_scratch"] = paired_bootstrap(
        [c["grown_final_test_loss"] for c in claims], [c["scratch_final_test_loss"] for c in claims]
    )
    summary["seeds_reaching_target"] = f"{len(reached)}/{len(claims)}"
    result = {
        "provenance": provenance(),
        "recipe": {**recipe.to_dict(), "growth": dataclasses.asdict(growth)},
        "tuning": tuning,
        "tuned": tuned,
        "claims": claims,
        "summary": summary,
        "stages": stages.records,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(a.out / "result.json", result)
    (a.out / "report.md").write_text(report(result))
    print(json.dumps({"tuned": tuned, "summary": summary}))
    return result


def report(r: dict) -> str:
    s = r["summary"]

    def fmt(k: str) -> str:
        if k not in s:
            return "not reached on every seed"
        v = s[k]
        ci = v.get("bootstrap_95")
        return f"{v['mean']:.1f}% (sd {v['std']:.1f}, range {v['min']:.1f} .. {v['max']:.1f}" + (
            f"; 95% bootstrap {ci['lo']:.1f} .. {ci['hi']:.1f})" if ci else ")"
        )

    rows = [
        [c["seed"], c["scratch_final_test_loss"], c["grown_final_test_loss"], c["saved_pct_with_source"],
         c["saved_pct"], c["wall_saved_pct_with_source"]]
        for c in r["claims"]
    ]  # fmt: skip
    t = r["tuning"]
    lines = [
        "# Growth against a tuned scratch baseline, on the test split",
        "",
        f"- **Saved, counting the source's training (FLOPs): {fmt('saved_pct_with_source')}**",
        "- Saved, counting the source (wall clock, growth and evaluations included): "
        + fmt("wall_saved_pct_with_source"),
        f"- Saved, not counting the source: {fmt('saved_pct')}",
        f"- Seeds whose grown run reached the scratch run's final test loss: {s['seeds_reaching_target']}",
        "",
        markdown_table(
            [
                "seed",
                "scratch test loss",
                "grown test loss",
                "saved % (with source)",
                "saved %",
                "wall saved % (with source)",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"Tuned on validation with seed {t['seed']} (no claim seed), each arm's final validation loss:",
        *[
            f"- {arm}: lr {r['tuned'][arm]['lr']:g} (scores {t[arm]['scores']}, inside the grid: {t[arm]['inside']}),"
            f" warm-up {r['tuned'][arm]['warmup']} (scores at that lr {t[arm]['warmup_scores']})"
            for arm in ("scratch", "grown")
        ],
        "",
        f"Commit {r['provenance']['git']['commit']}, {r['provenance']['machine']}, torch {r['provenance']['torch']}, "
        f"{r['provenance']['date']}; `{r['provenance']['command']}`; {r['seconds']:.0f} s in all.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

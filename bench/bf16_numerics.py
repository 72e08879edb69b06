"""Does bfloat16 autocast train as well as float32? The same recipes, seeds and data order in both precisions.

    python bench/bf16_numerics.py --out bench/results/NAME [--data DIR] [--seeds 0,1,2] [--configs tiny-cpu,demo-target]
                                  [--work runs/bench-bf16] [--set section.key=value ...]

For each configuration and seed, `lmforge train` runs twice, identical but for train.precision (float32, bfloat16:
autocast over float32 master weights, float32 losses and optimizer state). The runs read the same batches in the
same order from the same initial weights, so the per-seed difference isolates the precision. Reported per
configuration: the final validation and test losses (mean, spread over seeds), the paired bf16 - fp32 difference
with its bootstrap interval, set against the float32 seed spread (max - min over seeds): bf16 "holds" when the mean
difference is inside that spread. Speed: tokens/s of each run's training steps (evaluation excluded) and the paired
bf16 / fp32 ratio; runs are sequential, so the ratio is only meaningful on an otherwise idle machine.

Configurations: tiny-cpu = recipes/tiny-cpu.yaml (4 x 128, 300 steps x 16 x 256); demo-target = the target of
`make demo` trained from scratch (4 x 256, FFN 688, 8 heads, 400 steps x 16 x 128, lr 1.5e-3, warm-up 30).
Writes OUT/result.json and OUT/report.md; the last line printed is the summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import paired_bootstrap, provenance, spread, write_result  # noqa: E402
from lmforge.metrics.report import markdown_table, read_metrics  # noqa: E402
from lmforge.train.loop import Trainer, run_trainer  # noqa: E402
from lmforge.train.recipe import load_recipe  # noqa: E402

TINY = ROOT / "recipes" / "tiny-cpu.yaml"
CONFIGS = {
    "tiny-cpu": [],
    "demo-target": [
        "--model.num_layers=4",
        "--model.hidden_size=256",
        "--model.num_heads=8",
        "--model.ffn_size=688",
        "--train.steps=400",
        "--train.seq_len=128",
        "--optim.lr=1.5e-3",
        "--optim.warmup_steps=30",
    ],
}
PRECISIONS = ("float32", "bfloat16")


def train_tokens_per_s(out: Path) -> float:
    """Median tokens/s over the logged training intervals (evaluation and start-up excluded)."""
    rows = [r["tokens_per_s"] for r in read_metrics(out) if r.get("tokens_per_s")]
    rows.sort()
    return rows[len(rows) // 2] if rows else float("nan")


def run(config: str, precision: str, seed: int, data: str, work: Path, extra: list[str]) -> dict:
    out = work / config / f"{precision}-seed{seed}"
    overrides = [
        *CONFIGS[config],
        f"--data.path={data}",
        f"--train.precision={precision}",
        f"--train.seed={seed}",
        f"--train.out_dir={out}",
        "--train.eval_test=true",
        "--train.eval_batches=16",
        "--train.sample_prompts=[]",
        *extra,
    ]
    recipe = load_recipe(str(TINY), overrides)
    t0 = time.perf_counter()
    trainer, summary = run_trainer(lambda: Trainer(recipe))
    seconds = time.perf_counter() - t0
    row = {
        "config": config,
        "precision": precision,
        "seed": seed,
        "val_loss": summary["val_loss"],
        "test_loss": summary["test_loss"],
        "tokens": summary["tokens"],
        "seconds": round(seconds, 1),
        "tokens_per_s": train_tokens_per_s(out),
        "out_dir": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
    }
    print(json.dumps(row), flush=True)
    return row


def compare(rows: list[dict], seeds: list[int]) -> dict:
    """One configuration's verdict: paired differences bf16 - fp32 against the float32 seed spread."""
    by = {(r["precision"], r["seed"]): r for r in rows}
    out: dict = {}
    for metric in ("val_loss", "test_loss"):
        fp32 = [by["float32", s][metric] for s in seeds]
        bf16 = [by["bfloat16", s][metric] for s in seeds]
        diff = paired_bootstrap(bf16, fp32)
        seed_range = max(fp32) - min(fp32)
        out[metric] = {
            "float32": spread(fp32),
            "bfloat16": spread(bf16),
            "bf16_minus_fp32": diff,
            "fp32_seed_range": seed_range,
            "holds": abs(diff["mean"]) <= seed_range,
        }
    speed = [by["bfloat16", s]["tokens_per_s"] / by["float32", s]["tokens_per_s"] for s in seeds]
    out["speedup"] = spread(speed)
    return out


def report(result: dict) -> str:
    lines = [f"# bf16 autocast against float32 ({result['provenance']['date']})", ""]
    for config, verdict in result["verdicts"].items():
        lines += [f"## {config}", ""]
        table = []
        for metric in ("val_loss", "test_loss"):
            v = verdict[metric]
            d = v["bf16_minus_fp32"]
            table.append(
                [
                    metric,
                    f"{v['float32']['mean']:.4f} (sd {v['float32']['std']:.4f})",
                    f"{v['bfloat16']['mean']:.4f} (sd {v['bfloat16']['std']:.4f})",
                    f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]",
                    f"{v['fp32_seed_range']:.4f}",
                    "yes" if v["holds"] else "no",
                ]
            )
        header = ["metric", "float32", "bf16", "bf16 - fp32 [95% CI]", "fp32 seed range", "within"]
        lines += [markdown_table(header, table), ""]
        s = verdict["speedup"]
        speed = f"{s['mean']:.2f}x (range {s['min']:.2f}-{s['max']:.2f})"
        lines += [f"Training tokens/s, bf16 / fp32 (paired by seed): {speed}", ""]
    lines += ["Runs:", "", markdown_table(list(result["runs"][0]), [list(r.values()) for r in result["runs"]]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default="runs/data/starter3-bpe4096", help="a token dataset with a test split")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-bf16")
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value, every run")
    a = p.parse_args(argv)
    seeds, configs = [int(s) for s in a.seeds.split(",")], a.configs.split(",")
    if set(configs) - set(CONFIGS):
        p.error(f"--configs: a subset of {', '.join(CONFIGS)}")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    extra = [f"--{kv}" for kv in a.set]
    runs = [run(c, prec, s, a.data, a.work, extra) for c in configs for s in seeds for prec in PRECISIONS]
    verdicts = {c: compare([r for r in runs if r["config"] == c], seeds) for c in configs}
    result = {"provenance": provenance(argv), "seeds": seeds, "verdicts": verdicts, "runs": runs}
    write_result(a.out / "result.json", result)
    (a.out / "report.md").write_text(report(result))
    summary = {
        c: {m: round(v[m]["bf16_minus_fp32"]["mean"], 4) for m in ("val_loss", "test_loss")}
        | {"holds": v["val_loss"]["holds"] and v["test_loss"]["holds"], "speedup": round(v["speedup"]["mean"], 3)}
        for c, v in verdicts.items()
    }
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()

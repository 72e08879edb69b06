"""Trace-supervised fine-tuning against answer-only training, and the self-training round against more plain training.

    python bench/trace_sft.py --out bench/results/NAME [--data addition:3] [--sizes 1000,3000] [--seeds 0,1,2]
                              [--tune-seed 1000] [--lrs 1e-3,3e-3,1e-2] [--steps N] [--round-steps N]
                              [--work runs/bench-sft] [--set section.key=value ...]

recipes/sft-addition-cpu.yaml (a 4 x 128 decoder from scratch, character tokens, examples packed 128 tokens a row):
- answer: trained on query -> answer only (sft.trace false);
- trace: trained on query -> trace -> answer (both spans weighted 1);
- trace+self: the trace run's model, then one self-training round (sample 4 traces a training query at temperature
  0.7, keep those with the right answer and every trace value right, train --round-steps more steps on the training
  examples plus the kept traces);
- trace+more: the control of trace+self, the same --round-steps from the trace run's model on the training examples
  alone (what the round adds beyond more training).
Each of answer and trace has its lr tuned on validation answer accuracy at the smallest size with --tune-seed (the
grid widened until the best is inside); the rounds reuse the trace lr. Then every size and seed is scored on the
test split (sft.test_examples problems no run tuned on): answer accuracy by greedy generation, the trace's values,
how often an answer line was written, tokens and FLOPs (the round's generation counted). All arms see the same
problems and, packed, about the same tokens a step, so equal steps are equal tokens; the answer arm is also read at
equal problem passes from its curve. Writes OUT/result.json, OUT/report.md and OUT/accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import lr_search, paired_bootstrap, spread, write_claim_result  # noqa: E402
from lmforge.metrics.report import markdown_table, read_metrics  # noqa: E402

RECIPE = ROOT / "recipes" / "sft-addition-cpu.yaml"
ARMS = {"answer": ["--sft.trace=false"], "trace": []}


def sft_run(overrides: list[str], out: Path, splits=None, round_of: Path | None = None, kind: str = "") -> dict:
    """One run in this process: the recipe with overrides into `out` (a round or its control when round_of names
    the trace run to continue). Its row: final val / test metrics, tokens, FLOPs (generation included), seconds."""
    from lmforge.commands.sft import continue_training, load_sft_recipe, self_train_round, sft_trainer
    from lmforge.tasks.traces import trace_splits
    from lmforge.train.loop import run_trainer

    recipe, extra = load_sft_recipe(RECIPE, [*overrides, f"--train.out_dir={out}"])
    sc = extra["sft"]
    splits = splits or trace_splits(sc.data, {"train": sc.train_examples, "validation": sc.val_examples,
                                              "test": sc.test_examples}, sc.data_seed)  # fmt: skip
    t0, stats = time.perf_counter(), {}
    if round_of is None:
        _, summary = run_trainer(lambda: sft_trainer(recipe, sc, splits))
    elif kind == "self":
        summary, stats = self_train_round(recipe, sc, splits, round_of / "final", out, 1)
    else:
        summary = continue_training(recipe, sc, splits, round_of / "final", out, "control")
    row = {k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}
    row |= {"tokens": summary["tokens"], "flops": summary["flops"] + stats.get("generation_flops", 0.0)}
    return row | {"seconds": round(time.perf_counter() - t0, 1), "self_train": stats, "out_dir": str(out)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default="addition:3")
    p.add_argument("--sizes", default="1000,3000", help="training problems, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--steps", type=int, help="training steps of every main run (default: the recipe's)")
    p.add_argument("--round-steps", type=int, default=200, help="steps of the self-training round and its control")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-sft")
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value, every run")
    a = p.parse_args(argv)
    sizes, seeds = [int(x) for x in a.sizes.split(",")], [int(x) for x in a.seeds.split(",")]
    if a.tune_seed in seeds:
        p.error("--tune-seed must not be among --seeds")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    common = [f"--sft.data={a.data}", *([f"--train.steps={a.steps}"] if a.steps else []), *(f"--{kv}" for kv in a.set)]
    t_start = time.perf_counter()

    def arm_args(arm: str, size: int, lr: float, seed: int, test: bool) -> list[str]:
        run = [f"--sft.train_examples={size}", f"--optim.lr={lr}", f"--train.seed={seed}"]
        return [*ARMS[arm], *common, *run, f"--train.eval_test={'true' if test else 'false'}"]

    tuning, tune_rows = {}, []
    for arm in ARMS:

        def score(lr: float, arm: str = arm) -> float:
            out = a.work / "tune" / arm / f"lr{lr:g}"
            row = {"arm": arm, "lr": lr, **sft_run(arm_args(arm, sizes[0], lr, a.tune_seed, False), out)}
            tune_rows.append(row)
            print(json.dumps(row), flush=True)
            return -row["val_answer_acc"] + 1e-3 * row["val_loss_response"]  # accuracy; ties to the lower loss

        tuning[arm] = lr_search(score, [float(x) for x in a.lrs.split(",")])
        print(f"# {arm}: best lr {tuning[arm]['best']:g} of {tuning[arm]['scores']}", flush=True)

    claim: dict[str, dict[str, list[dict]]] = {}
    for size in sizes:
        rows = claim.setdefault(str(size), {"answer": [], "trace": [], "trace+self": [], "trace+more": []})
        for seed in seeds:
            for arm in ARMS:
                out = a.work / "claim" / f"n{size}" / arm / f"seed{seed}"
                rows[arm].append(sft_run(arm_args(arm, size, tuning[arm]["best"], seed, True), out))
                print(json.dumps({"size": size, "arm": arm, "seed": seed, **rows[arm][-1]}), flush=True)
            trace_out = Path(rows["trace"][-1]["out_dir"])
            args = arm_args("trace", size, tuning["trace"]["best"], seed, True)
            args.append(f"--sft.self_train_steps={a.round_steps}")
            for arm, kind in (("trace+self", "self"), ("trace+more", "more")):
                out = a.work / "claim" / f"n{size}" / arm / f"seed{seed}"
                row = sft_run(args, out, round_of=trace_out, kind=kind)
                row["flops"] += rows["trace"][-1]["flops"]  # the trace run it continues is part of its cost
                row["tokens"] += rows["trace"][-1]["tokens"]
                rows[arm].append(row)
                print(json.dumps({"size": size, "arm": arm, "seed": seed, **row}), flush=True)

    verdicts = {
        size: judge(rows, length_ratio([*common, f"--sft.train_examples={size}"])) for size, rows in claim.items()
    }
    a.out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(claim, a.out / "accuracy.png")
    setup = {
            "recipe": RECIPE.name,
            "data": a.data,
            "steps": a.steps,
            "round_steps": a.round_steps,
            "sizes": sizes,
            "seeds": seeds,
            "set": a.set,
        }  # fmt: skip
    result = write_claim_result(a.out / "result.json", argv, setup, tuning, verdicts, claim, tune_rows, t_start)
    (a.out / "report.md").write_text(f"# Trace SFT on {a.data} ({result['provenance']['date']})\n\n" + report(verdicts))
    print(json.dumps({n: {arm: v["test_answer_acc"]["mean"] for arm, v in vs.items()} for n, vs in verdicts.items()}))
    return result


def length_ratio(overrides: list[str]) -> float:
    """Tokens of a training example written answer-only over written with its trace (this recipe's tokenizer and
    template, summed over the training split): how much less an answer-only pass over the problems costs."""
    from lmforge.commands.sft import load_sft_recipe
    from lmforge.tasks.traces import completion_text, trace_splits
    from lmforge.train.trace_task import TraceTemplate, char_tokenizer_files

    _, extra = load_sft_recipe(RECIPE, overrides)
    sc = extra["sft"]
    train = trace_splits(sc.data, {"train": sc.train_examples, "validation": sc.val_examples,
                                   "test": sc.test_examples}, sc.data_seed)["train"]  # fmt: skip
    template = TraceTemplate(char_tokenizer_files([ex.query + "".join(completion_text(ex, True)) for ex in train]))
    return sum(len(template.encode(ex, False)[0]) for ex in train) / sum(
        len(template.encode(ex, True)[0]) for ex in train
    )


def at_equal_passes(answer_row: dict, trace_row: dict, ratio: float) -> float | None:
    """The answer arm's test accuracy at its evaluation nearest to as many passes over the training problems as the
    trace arm made in all: trace tokens x `ratio` (length_ratio), read from its curve."""
    curve = [(r["tokens"], r["test_answer_acc"]) for r in read_metrics(answer_row["out_dir"]) if "test_answer_acc" in r]
    target = trace_row["tokens"] * ratio
    return min(curve, key=lambda pt: abs(pt[0] - target))[1] if curve else None


def judge(rows: dict[str, list[dict]], ratio: float) -> dict:
    out = {}
    for arm, rs in rows.items():
        acc = [r["test_answer_acc"] for r in rs]
        base = "trace" if arm in ("trace+self", "trace+more") else "answer"
        out[arm] = {
            "test_answer_acc": spread(acc),
            "test_trace_values": spread([r.get("test_trace_values", float("nan")) for r in rs]),
            "test_answered": spread([r["test_answered"] for r in rs]),
            "minus_" + base: paired_bootstrap(acc, [r["test_answer_acc"] for r in rows[base]]),
            "flops": spread([r["flops"] for r in rs]),
            "tokens": spread([r["tokens"] for r in rs]),
            "seconds": spread([r["seconds"] for r in rs]),
        }
    out["answer"]["test_answer_acc_at_equal_passes"] = spread(
        [at_equal_passes(a, t, ratio) for a, t in zip(rows["answer"], rows["trace"])]
    )
    out["trace+self"]["minus_trace+more"] = paired_bootstrap(
        [r["test_answer_acc"] for r in rows["trace+self"]], [r["test_answer_acc"] for r in rows["trace+more"]]
    )
    return out


def report(verdicts: dict) -> str:
    text = []
    for size, vs in verdicts.items():
        rows = []
        for arm, v in vs.items():
            diffs = "; ".join(f"{k[6:]}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
                              for k, d in v.items() if k.startswith("minus_"))  # fmt: skip
            rows.append([arm, f"{v['test_answer_acc']['mean']:.3f} (sd {v['test_answer_acc']['std']:.3f})", diffs,
                         f"{v['test_trace_values']['mean']:.3f}", f"{v['test_answered']['mean']:.3f}",
                         f"{v['tokens']['mean']:.3g}", f"{v['flops']['mean']:.3g}"])  # fmt: skip
        header = ["arm", "test answer accuracy", "minus [95% CI]", "trace values", "answered", "tokens", "FLOPs"]
        text.append(f"## {size} training problems\n\n" + markdown_table(header, rows) + "\n")
    return "\n".join(text)


def plot_accuracy(claim: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(claim), figsize=(6 * len(claim), 4), dpi=120, squeeze=False)
    for ax, (size, rows) in zip(axes[0], claim.items()):
        for i, (arm, rs) in enumerate(rows.items()):
            for j, r in enumerate(rs):
                pts = [
                    (m["tokens"], m["test_answer_acc"]) for m in read_metrics(r["out_dir"]) if "test_answer_acc" in m
                ]
                if arm in ("trace+self", "trace+more"):  # its curve continues the trace run's
                    pts = [(t + rows["trace"][j]["tokens"], v) for t, v in pts]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=f"C{i}", alpha=0.7, markersize=2, label=arm if j == 0 else None)
        ax.set(title=f"{size} training problems", xlabel="training tokens", ylabel="test answer accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Multi-task training against single-task fine-tuning: one model with a shared trunk instead of N models.

    python bench/multitask.py --out bench/results/NAME [--tasks mr,bbc-topic,hyperbaton] [--init pkg:all-minilm-l6-v2]
                              [--arms single,heads,branches,branches-uncertainty] [--steps-per-task 300]
                              [--seeds 0,1,2] [--tune-seed 1000] [--lrs 3e-5,5e-5,1e-4] [--work runs/bench-multitask]

recipes/finetune-minilm-mr.yaml's settings (batch 32, 64 tokens, warm-up 30, weight decay 0.01) for every run:
- single: `lmforge finetune` of each task on its own, --steps-per-task steps each (N models);
- heads: `lmforge multitask`, the whole encoder shared, a plain head per task (MT-DNN);
- branches: the lower layers shared, the top --branch-layers (2) copied into a branch per task (the method);
- branches-uncertainty: branches with learned uncertainty weighting.
The multi-task arms draw the tasks in turn (round robin) for N x --steps-per-task steps: equal steps per task. Each
arm's lr is tuned on the validation score (single: per task; multi-task: the mean of the tasks' headline metrics)
with --tune-seed, widened until the best is inside; then every seed's final test scores are read (train.eval_test).
Reported per arm: the mean over tasks of the test headline metric (mean, sd over seeds, paired difference against
single with its bootstrap interval), each task's, the parameters of what is deployed, and the wall time. Writes
OUT/result.json, OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import lr_search, paired_bootstrap, run_lmforge, spread, write_claim_result  # noqa: E402
from lmforge.metrics.report import markdown_table  # noqa: E402

SETTINGS = ROOT / "recipes" / "finetune-minilm-mr.yaml"
MULTI = ROOT / "recipes" / "multitask-minilm.yaml"
ARMS = {  # arm -> overrides; --branch-layers sets how many of the top layers become each task's branch
    "heads": ["--multitask.trunk_layers=-1", "--multitask.branch_layers=0"],
    "branches": ["--multitask.trunk_layers=-1", "--multitask.branch_init=upper"],
    "branches-uncertainty": [
        "--multitask.trunk_layers=-1",
        "--multitask.branch_init=upper",
        "--multitask.weighting=uncertainty",
    ],
}


def headline(out: dict, prefix: str, task: str | None, metric: str) -> float:
    """A run's headline score: `prefix`_<task>_<metric> of a multi-task run, `prefix`_<metric> of a single one."""
    return out[f"{prefix}_{task}_{metric}" if task else f"{prefix}_{metric}"]


def deployed_parameters(init: str, labels: dict[str, int], branch_layers: int) -> dict[str, int]:
    """Parameters of what each arm deploys, counted on models built on the meta device (no memory)."""
    import torch

    from lmforge.io.checkpoints import read_checkpoint
    from lmforge.model.multitask import MultiTaskModel
    from lmforge.model.transformer import Transformer
    from lmforge.objectives.classify import classifier_config

    cfg = classifier_config(read_checkpoint(init)[0], 2, 0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        single = sum(count(Transformer(cfg.replace(num_labels=n))) for n in labels.values())
        heads = count(MultiTaskModel(cfg, cfg.num_layers, labels))
        branches = count(MultiTaskModel(cfg, cfg.num_layers - branch_layers, labels))
    return {"single": single, "heads": heads, "branches": branches, "branches-uncertainty": branches + len(labels)}


def main(argv: list[str] | None = None) -> dict:
    from lmforge.tasks import load_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tasks", default="mr,bbc-topic,hyperbaton")
    p.add_argument("--init", default="pkg:all-minilm-l6-v2")
    p.add_argument("--arms", default="single,heads,branches,branches-uncertainty")
    p.add_argument("--steps-per-task", type=int, default=300)
    p.add_argument("--branch-layers", type=int, default=2, help="the top layers copied into each task's branch")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--lrs", default="3e-5,5e-5,1e-4")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-multitask")
    a = p.parse_args(argv)
    tasks, seeds, arms = a.tasks.split(","), [int(s) for s in a.seeds.split(",")], a.arms.split(",")
    if "single" not in arms or set(arms) - {"single", *ARMS} or a.tune_seed in seeds:
        p.error(f"--arms: single and others of {', '.join(ARMS)}; --tune-seed not among --seeds")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    datas = {t: load_task(t) for t in tasks}
    names = {t: datas[t].name for t in tasks}
    metric = {t: datas[t].metric for t in tasks}
    t_start = time.perf_counter()

    def run(arm: str, task: str | None, lr: float, seed: int, test: bool) -> dict:
        leaf = f"seed{seed}" if test else f"lr{lr:g}"
        where = a.work / ("claim" if test else "tune") / arm / (names[task] if task else "all") / leaf
        common = [f"--train.init_from={a.init}", f"--optim.lr={lr}", f"--train.seed={seed}", f"--train.out_dir={where}",
                  f"--train.eval_test={'true' if test else 'false'}", "--train.log_every=50"]  # fmt: skip
        if arm == "single":
            args = ["finetune", str(SETTINGS), f"--finetune.task={task}", f"--train.steps={a.steps_per_task}", *common]
        else:
            steps = a.steps_per_task * len(tasks)
            args = [
                "multitask",
                str(MULTI),
                f"--multitask.tasks=[{','.join(tasks)}]",
                f"--train.steps={steps}",
                "--multitask.sampling=round_robin",
                f"--train.eval_every={steps // 6}",
                *ARMS[arm],
                *common,
            ]
            if arm != "heads":
                args.append(f"--multitask.branch_layers={a.branch_layers}")
        out, seconds = run_lmforge(*args, log=where.parent / f"{where.name}.log")
        row = {"arm": arm, "task": task, "lr": lr, "seed": seed, "seconds": round(seconds, 1), **out}
        print(json.dumps(row), flush=True)
        return row

    def score(out: dict, task: str | None, prefix: str) -> float:
        if task is not None:
            return headline(out, prefix, None, metric[task])
        return sum(headline(out, prefix, names[t], metric[t]) for t in tasks) / len(tasks)

    tuning, tune_rows = {}, []
    units = [("single", t) for t in tasks] + [(arm, None) for arm in arms if arm != "single"]
    for arm, task in units:

        def objective(lr: float, arm: str = arm, task: str | None = task) -> float:
            row = run(arm, task, lr, a.tune_seed, False)
            tune_rows.append(row)
            return -score(row, task, "val")

        key = f"single:{task}" if task else arm
        tuning[key] = lr_search(objective, [float(x) for x in a.lrs.split(",")])
        print(f"# {key}: best lr {tuning[key]['best']:g} of {tuning[key]['scores']}", flush=True)

    claim: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, task in units:
            key = f"single:{task}" if task else arm
            row = run(arm, task, tuning[key]["best"], seed, True)
            claim[arm].append(row)

    def per_seed(arm: str) -> tuple[list[float], dict[str, list[float]]]:
        """Each seed's mean test score over the tasks, and each task's test scores by seed."""
        by_task = {t: [] for t in tasks}
        for row in claim[arm]:
            for t in tasks:
                if arm == "single" and row["task"] == t:
                    by_task[t].append(score(row, t, "test"))
                elif arm != "single":
                    by_task[t].append(headline(row, "test", names[t], metric[t]))
        return [sum(v[i] for v in by_task.values()) / len(tasks) for i in range(len(seeds))], by_task

    deployed = deployed_parameters(a.init, {names[t]: len(datas[t].labels) or 1 for t in tasks}, a.branch_layers)
    single_means, _ = per_seed("single")
    verdicts = {}
    for arm in arms:
        means, by_task = per_seed(arm)
        verdicts[arm] = {
            "test_mean_score": spread(means),
            "minus_single": paired_bootstrap(means, single_means),
            "by_task": {t: spread(v) for t, v in by_task.items()},
            "parameters": deployed[arm],
            "seconds": spread([sum(r["seconds"] for r in claim[arm] if r["seed"] == s) for s in seeds]),
        }
    a.out.mkdir(parents=True, exist_ok=True)
    setup = vars(a) | {"out": str(a.out), "work": str(a.work), "metrics": metric}
    result = write_claim_result(a.out / "result.json", argv, setup, tuning, verdicts, claim, tune_rows, t_start)
    header = ["arm", "mean test score (sd)", "minus single [95% CI]", *(names[t] for t in tasks)]
    header += ["parameters", "seconds / seed"]
    rows = [[arm, f"{v['test_mean_score']['mean']:.4f} ({v['test_mean_score']['std']:.4f})",
             f"{v['minus_single']['mean']:+.4f} [{v['minus_single']['lo']:+.4f}, {v['minus_single']['hi']:+.4f}]",
             *(f"{v['by_task'][t]['mean']:.4f}" for t in tasks), f"{v['parameters'] / 1e6:.1f}M",
             f"{v['seconds']['mean']:.0f}"] for arm, v in verdicts.items()]  # fmt: skip
    (a.out / "report.md").write_text(
        f"# Multi-task ({result['provenance']['date']})\n\n" + markdown_table(header, rows) + "\n"
    )
    print(json.dumps({arm: round(v["test_mean_score"]["mean"], 4) for arm, v in verdicts.items()}))
    return result


if __name__ == "__main__":
    main()

"""Compressing a fine-tuned classifier by distillation: the uncertainty-driven method against its baselines.

    python bench/classify_kd.py --out bench/results/NAME --teachers mr=runs/finetune-minilm-mr/final,...
                                [--arms ce,kd,every-other-kd,merge-kd,merge-uncertainty,merge-teacher-uncertainty]
                                [--seeds 0,1,2] [--tune-seed 1000] [--lrs 5e-5,1e-4,2e-4] [--steps 300]
                                [--work runs/bench-kd]

For each task, the teacher (a fine-tuned 6-layer encoder, e.g. all-MiniLM-L6-v2) is shrunk to half its layers with
`lmforge shrink`, and each student arm is trained with `lmforge finetune` (recipes/finetune-minilm-mr.yaml's
settings: batch 32, 64 tokens, warm-up 30, weight decay 0.01):
- ce: the merged-groups student, hard labels only (no distillation);
- kd: the merged-groups student, hard labels + soft targets (T = 2);
- every-other-kd: layers 1, 3, 5 kept (DistilBERT / PKD), hard labels + soft targets;
- merge-kd: the method without uncertainty: merged groups, attention frozen, + feature MSE against each group's
  output;
- merge-uncertainty: the method: as merge-kd, each feature term weighted by a predicted log-variance;
- merge-teacher-uncertainty: as merge-kd, the soft targets weighted by the teacher's confidence.
Each arm's lr is tuned on the task's validation split with --tune-seed (widened until the best is inside); then
every seed's final TEST accuracy is read (train.eval_test), against the teacher's test accuracy scored the same way.
Writes OUT/result.json and OUT/report.md (mean, sd and the share of the teacher's score per arm and task, the
paired difference of each arm against merge-uncertainty with its bootstrap interval).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.experiments.harness import lr_search, paired_bootstrap, provenance, run_lmforge, spread, write_result  # noqa: E402
from lmforge.metrics.report import markdown_table  # noqa: E402

RECIPE = ROOT / "recipes" / "finetune-minilm-mr.yaml"
FREEZE = '["layers.*.attn.*", "layers.*.attn_norm.*"]'
ARMS = {  # arm -> (student, kd overrides)
    "ce": ("merge", ["--kd.kd_weight=0"]),
    "kd": ("merge", []),
    "every-other-kd": ("every-other", []),
    "merge-kd": ("merge", ["--kd.feature_weight=1", f"--kd.freeze={FREEZE}"]),
    "merge-uncertainty": ("merge", ["--kd.feature_weight=1", f"--kd.freeze={FREEZE}", "--kd.uncertainty=student"]),
    "merge-teacher-uncertainty": (
        "merge",
        ["--kd.feature_weight=1", f"--kd.freeze={FREEZE}", "--kd.uncertainty=teacher"],
    ),
}
METHOD = "merge-uncertainty"
SHRINK = {"merge": ["--method", "merge-groups"], "every-other": ["--method", "every-other", "--layers", "3"]}


class Student:
    """One arm's `lmforge finetune` run on one task: its last JSON line (validation, and test when asked)."""

    def __init__(self, task: str, teacher: str, students: dict[str, Path], work: Path, steps: int):
        self.task, self.teacher, self.students, self.work, self.steps = task, teacher, students, work, steps

    def __call__(self, arm: str, lr: float, seed: int, test: bool) -> dict:
        kind, extra = ARMS[arm]
        out = self.work / ("claim" if test else "tune") / arm / (f"seed{seed}" if test else f"lr{lr:g}")
        args = [f"--train.init_from={self.students[kind]}", f"--kd.teacher={self.teacher}", f"--optim.lr={lr}"]
        args += [f"--finetune.task={self.task}", f"--train.seed={seed}", f"--train.out_dir={out}"]
        args += [f"--train.steps={self.steps}", f"--train.eval_test={'true' if test else 'false'}", *extra]
        return lmforge("finetune", str(RECIPE), *args, log=out.parent / f"{out.name}.log")  # lr0.0001: no suffix cut


def lmforge(*args: str, log: Path) -> dict:
    return run_lmforge(*args, log=log)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--teachers", required=True, help="task=checkpoint,... (fine-tuned teachers, one per task)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tune-seed", type=int, default=1000)
    p.add_argument("--lrs", default="5e-5,1e-4,2e-4", help="each arm's lr grid (widened as needed)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-kd")
    a = p.parse_args(argv)
    teachers = dict(item.split("=", 1) for item in a.teachers.split(","))
    arms, seeds = a.arms.split(","), [int(s) for s in a.seeds.split(",")]
    if set(arms) - set(ARMS) or METHOD not in arms or a.tune_seed in seeds:
        p.error(f"--arms: {METHOD} and others of {', '.join(ARMS)}; --tune-seed not among --seeds")
    if (a.out / "result.json").exists():
        p.error(f"{a.out / 'result.json'} exists: choose another --out")
    t_start, result = time.perf_counter(), {"provenance": provenance(argv), "tasks": {}}
    for task, teacher in teachers.items():
        work = a.work / Path(task).stem  # a built-in name, or a data file named by its stem
        students = {}
        for kind, extra in SHRINK.items():
            if kind not in {ARMS[arm][0] for arm in arms}:
                continue
            students[kind] = work / f"student-{kind}"
            if not (students[kind] / "config.json").exists():
                lmforge("shrink", teacher, "--out", str(students[kind]), *extra, log=work / f"shrink-{kind}.log")
        teacher_test = lmforge(
            "eval", teacher, "--task", task, "--split", "test", "--seq-len", "64", log=work / "teacher.log"
        )

        run = Student(task, teacher, students, work, a.steps)
        tuning, claim = {}, {arm: [] for arm in arms}
        for arm in arms:
            tuning[arm] = lr_search(
                lambda lr, arm=arm, run=run: -run(arm, lr, a.tune_seed, False)["val_accuracy"],
                [float(x) for x in a.lrs.split(",")],
            )
        for seed in seeds:
            for arm in arms:
                claim[arm].append(run(arm, tuning[arm]["best"], seed, True)["test_accuracy"])
        result["tasks"][task] = {
            "teacher_test_accuracy": teacher_test["accuracy"],
            "tuning": tuning,
            "test_accuracy": {arm: spread(v) for arm, v in claim.items()},
            "share_of_teacher": {arm: spread([x / teacher_test["accuracy"] for x in v]) for arm, v in claim.items()},
            "minus_method": {arm: paired_bootstrap(v, claim[METHOD]) for arm, v in claim.items() if arm != METHOD},
            "runs": claim,
        }
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    write_result(a.out / "result.json", result)
    rows = []
    for task, r in result["tasks"].items():
        for arm in arms:
            acc, share = r["test_accuracy"][arm], r["share_of_teacher"][arm]
            diff = r["minus_method"].get(arm)
            rows.append([task, arm, f"{acc['mean']:.4f} (sd {acc['std']:.4f})", f"{share['mean']:.3f}",
                         f"{diff['mean']:+.4f} [{diff['lo']:+.4f}, {diff['hi']:+.4f}]" if diff else "-"])  # fmt: skip
    header = ["task", "arm", "test accuracy", "of teacher", f"- {METHOD} [95% CI]"]
    (a.out / "report.md").write_text(
        f"# distillation ({result['provenance']['date']})\n\n" + markdown_table(header, rows) + "\n"
    )
    print(
        json.dumps({t: {arm: r["share_of_teacher"][arm]["mean"] for arm in arms} for t, r in result["tasks"].items()})
    )
    return result


if __name__ == "__main__":
    main()

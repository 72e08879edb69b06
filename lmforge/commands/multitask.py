"""`lmforge multitask RECIPE.yaml`: several labelled tasks trained at once on a shared trunk, a branch per task.

The recipe is `lmforge finetune`'s without its finetune section (train.init_from is the checkpoint) plus a
`multitask:` section (MultiTaskConfig): the tasks (built-in names, files or folders, as finetune.task), how the
model is cut into trunk and branches (model/multitask.py), how batches pick their task (train/task_mixture.py) and
how the task losses combine (objectives/multitask.py). The run folder is `lmforge train`'s; final/<task>/ is each
task's trunk + branch + head as a standard HF sequence classifier (`lmforge eval final/<task> --task <task>`
scores it). The last line printed is one JSON object with the final validation metrics of every task.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from lmforge.errors import UserError
from lmforge.train.loop import RESUMABLE_KEYS, Trainer, run_trainer
from lmforge.train.recipe import load_recipe_sections, recipe_help


@dataclass(frozen=True)
class MultiTaskConfig:
    tasks: tuple[str, ...] = ()  # built-in task names, files or folders (as finetune.task)
    task_weights: tuple[float, ...] = ()  # fixed weighting: one per task; () = all 1 (the plain sum)
    split_seed: int = 0
    trunk_layers: int = -1  # the checkpoint's lower layers shared by all tasks; -1 = all of them
    branch_layers: int = 0  # each task's own layers on top of the trunk (0: a plain head per task)
    branch_init: str = "upper"  # upper (copies of the checkpoint's layers above the trunk) | fresh
    sampling: str = "proportional"  # proportional | temperature | round_robin
    temperature: float = 2.0  # for sampling: temperature
    weighting: str = "fixed"  # fixed | uncertainty | loss_ratio
    alpha: float = 1.0  # loss_ratio's exponent


def multitask_trainer(recipe, mc: MultiTaskConfig, resume: bool = False) -> Trainer:
    from lmforge.model.multitask import multitask_from_checkpoint
    from lmforge.objectives.multitask import MultiTaskClassification
    from lmforge.tasks import load_task
    from lmforge.train.task import LabelledText
    from lmforge.train.task_mixture import TaskMixture

    tc = recipe.train
    if len(mc.tasks) < 1 or len(set(mc.tasks)) != len(mc.tasks):
        raise UserError("multitask.tasks: one or more distinct tasks (built-in names, files or folders)")
    if not tc.init_from:
        raise UserError("train.init_from is required: the checkpoint whose layers become the trunk and branches")
    if tc.parallel == "fsdp":
        raise UserError("multitask runs in one process or under DDP (train.parallel ddp), not FSDP")
    datas = [load_task(t, seed=mc.split_seed) for t in mc.tasks]
    names = [d.name for d in datas]
    if len(set(names)) != len(names):
        raise UserError(f"multitask.tasks name the same task twice: {names}")
    sizes = {d.name: len(d.labels) if d.kind == "classification" else 1 for d in datas}
    model = multitask_from_checkpoint(tc.init_from, sizes, mc.trunk_layers, mc.branch_layers, mc.branch_init, tc.seed)
    pad = model.config.pad_token_id
    tasks = [LabelledText(d, model.tokenizer_files, tc, pad_id=pad) for d in datas]
    mixture = TaskMixture(names, tasks, mc.sampling, mc.temperature, tc.seed)
    objective = MultiTaskClassification(
        names, [d.kind for d in datas], list(sizes.values()), [d.metric for d in datas], mc.weighting,
        mc.task_weights, mc.alpha,
    )  # fmt: skip
    return Trainer(recipe, task=mixture, objective=objective, resume=resume, model=model,
                   sections={"multitask": dataclasses.asdict(mc)}, resumable_keys=RESUMABLE_KEYS)  # fmt: skip


def load_multitask_recipe(path, overrides=()):
    return load_recipe_sections(path, list(overrides), {"multitask": MultiTaskConfig})


def register(sub) -> None:
    p = sub.add_parser(
        "multitask",
        help="train several labelled tasks at once: a shared trunk, a branch network and head per task",
        description="Train multitask.tasks on train.init_from cut into a shared trunk and per-task branches; override "
        "any key as --section.key=value (docs/multitask.md). final/<task>/ is each task's standard HF classifier.",
    )
    p.add_argument("recipe", help=recipe_help("recipe with a multitask: section", "multitask-minilm"))
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args) -> int:
    recipe, extra = load_multitask_recipe(args.recipe, args.overrides)
    trainer, summary = run_trainer(lambda: multitask_trainer(recipe, extra["multitask"], resume=args.resume))
    if trainer.env.is_main:
        final = {k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}
        print(json.dumps({"steps": summary["steps"], "tokens": summary["tokens"], "flops": summary["flops"], **final}))
    return 0

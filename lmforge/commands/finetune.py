"""`lmforge finetune RECIPE.yaml`: fine-tune a checkpoint as a sequence classifier (or regressor) on a task.

The recipe is lmforge's (optim, train; train.init_from is the checkpoint: HF folder, lmforge folder or .gguf) plus a
`finetune:` section (FinetuneConfig). The task is a built-in name (`lmforge.tasks.TASKS`), the user's JSONL / CSV /
TSV file or folder, or a GLUE task folder. Encoders (BERT) classify their first token through the pooler, decoders
(Llama, GPT-2) their last non-padding token. A checkpoint without a classifier of the task's size gets a fresh head
(one line says so). train.seq_len is the longest input (longer ones are cut); validation scores the whole
validation split at every train.eval_every steps. The run folder is `lmforge train`'s: metrics.jsonl, checkpoints
(exact --resume), final/ in HF form (AutoModelForSequenceClassification loads it). The last line printed is one JSON
object with the final validation metrics.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from lmforge.errors import UserError
from lmforge.train.loop import RESUMABLE_KEYS, Trainer, run_trainer
from lmforge.train.recipe import Recipe, load_recipe_sections, recipe_help


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = ""  # a built-in task, a .jsonl / .csv / .tsv file or folder, or a GLUE task folder
    split_seed: int = 0  # seed of the train / validation / test split, for data that does not come split
    new_head: bool = False  # replace a classifier head of another size instead of refusing


def finetune_trainer(recipe: Recipe, fc: FinetuneConfig, resume: bool = False, kd=None) -> Trainer:
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.objectives.classify import Classification, model_for_task
    from lmforge.tasks import load_task
    from lmforge.train.task import LabelledText

    tc = recipe.train
    if not fc.task:
        raise UserError("finetune.task is required: a built-in task name, a data file or folder, or a GLUE folder")
    if not tc.init_from:
        raise UserError("train.init_from is required: the checkpoint to fine-tune")
    data = load_task(fc.task, seed=fc.split_seed)
    n = len(data.labels) if data.kind == "classification" else 1
    model = model_for_task(tc.init_from, n, tc.seed, fc.new_head)  # reads the checkpoint once, tokenizer included
    cfg, tok = model.config, Tokenizer.from_files(model.tokenizer_files)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer of {tc.init_from} has {tok.vocab_size} tokens, its model embeds {cfg.vocab_size}: "
            "they do not belong together"
        )
    if cfg.position == "learned" and tc.seq_len > cfg.max_seq_len:
        raise UserError(f"train.seq_len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    task = LabelledText(data, model.tokenizer_files, tc, pad_id=cfg.pad_token_id)
    objective, sections = Classification(data.kind, n), {"finetune": dataclasses.asdict(fc)}
    if kd is not None and kd.teacher:  # knowledge distillation from a fine-tuned teacher of the same task
        objective = kd_objective(model, data.kind, n, kd, tc.seed)
        sections["kd"] = dataclasses.asdict(kd) | {"layer_map": objective.layer_map}
    return Trainer(
        recipe,
        task=task,
        objective=objective,
        resume=resume,
        sections=sections,
        resumable_keys=RESUMABLE_KEYS,
        model=model,
    )


def kd_objective(student, kind: str, n: int, kd, seed: int):
    """The distillation objective: the teacher loaded and checked against the student, frozen parameters frozen."""
    from fnmatch import fnmatchcase

    from lmforge.objectives.classify import model_for_task
    from lmforge.objectives.classify_kd import ClassifierDistillation

    teacher = model_for_task(kd.teacher, n, seed, False)
    s_tok, t_tok = (m.tokenizer_files.get("tokenizer.json") for m in (student, teacher))
    if s_tok != t_tok or student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(
            f"kd.teacher {kd.teacher} and the student train.init_from have different tokenizers or vocabularies "
            f"({teacher.config.vocab_size} and {student.config.vocab_size} tokens): their logits do not align"
        )
    Ls, Lt = student.config.num_layers, teacher.config.num_layers
    layer_map = list(kd.layer_map) or [round((i + 1) * Lt / Ls) - 1 for i in range(Ls)]
    if kd.feature_weight and (len(layer_map) != Ls or not all(0 <= j < Lt for j in layer_map)):
        raise UserError(f"kd.layer_map {layer_map}: one teacher layer (0..{Lt - 1}) per student layer ({Ls})")
    for pattern in kd.freeze:
        names = [name for name, _ in student.named_parameters() if fnmatchcase(name, pattern)]
        if not names:
            raise UserError(f"kd.freeze pattern {pattern!r} matches no parameter of the student")
    for name, p in student.named_parameters():
        if any(fnmatchcase(name, pattern) for pattern in kd.freeze):
            p.requires_grad_(False)
    print(f"kd: student layer -> teacher layer {dict(enumerate(layer_map))}", flush=True)
    return ClassifierDistillation(kind, n, kd, teacher, student.config, layer_map)


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint as a sequence classifier or regressor on a labelled task",
        description="Fine-tune train.init_from on finetune.task; override any key as --section.key=value. The last "
        "line printed is the final validation metrics as one JSON object.",
    )
    p.add_argument("recipe", help=recipe_help("recipe with a finetune: section", "finetune-minilm-mr"))
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")
    p.set_defaults(func=run, accepts_overrides=True)


def load_finetune_recipe(path, overrides=()):
    """(recipe, {"finetune": FinetuneConfig, "kd": KDConfig}): the sections `lmforge finetune` reads."""
    from lmforge.objectives.classify_kd import KDConfig

    return load_recipe_sections(path, list(overrides), {"finetune": FinetuneConfig, "kd": KDConfig})


def run(args) -> int:
    recipe, extra = load_finetune_recipe(args.recipe, args.overrides)
    trainer, summary = run_trainer(
        lambda: finetune_trainer(recipe, extra["finetune"], resume=args.resume, kd=extra["kd"])
    )
    if trainer.env.is_main:
        final = {k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}
        print(f"val loss {summary['val_loss_start']:.4f} -> {summary['val_loss']:.4f} after {summary['steps']} steps; "
              f"run in {summary['out_dir']}")  # fmt: skip
        print(json.dumps({"steps": summary["steps"], "tokens": summary["tokens"], "flops": summary["flops"], **final}))
    return 0

"""`lmforge eval MODEL (--data CORPUS_DIR | --task TASK) [--split val|test]`: score any model lmforge loads.

--data: the mean next-token loss and perplexity on a token dataset's split (fixed windows of --seq-len tokens
spread evenly over the whole split, --batches of --batch-size). --task: a classifier's (or regressor's) scores on a
task's split (every example; the task's headline metric first). A grown, fused, distilled or fine-tuned model is
scored the same way. One JSON line.
"""

from __future__ import annotations

import argparse
import json

from lmforge.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model: perplexity on a token dataset, or a classifier's metrics on a task",
        description="Score MODEL (HF folder, lmforge folder or .gguf) on --data (perplexity) or --task (accuracy, "
        "F1, Matthews, Pearson / Spearman). Prints one JSON line.",
    )
    p.add_argument("model", help="checkpoint to score")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="token dataset folder (`lmforge data`), built with the model's tokenizer")
    what.add_argument("--task", help="task: a built-in name, a data file or folder, or a GLUE task folder")
    p.add_argument("--split", choices=("val", "test"), default="val", help="which split (default: val)")
    p.add_argument("--seq-len", type=int, default=256, help="window (--data) or longest input (--task); 256")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default: 8)")
    p.add_argument("--batches", type=int, default=32, help="--data: windows = batches x batch size (default: 32)")
    p.add_argument("--split-seed", type=int, default=0, help="--task: the seed of its split, as fine-tuning used")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.io.checkpoints import load
    from lmforge.train.evaluate import ONE_PROCESS, Evaluator

    for flag in ("seq_len", "batch_size", "batches"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    model = load(args.model)
    cfg = model.config
    if cfg.position == "learned" and args.seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if args.data:
        from lmforge.data.tokens import TokenDataset, check_tokenizer_matches
        from lmforge.objectives.lm import perplexity, split_loss

        if cfg.head != "lm":
            raise UserError(f"{args.model} has a {cfg.head!r} head; perplexity needs an LM head")
        data = TokenDataset(args.data, args.split)
        check_tokenizer_matches(data.manifest, cfg.vocab_size, getattr(model, "tokenizer_files", None))
        loss = split_loss(model, data, args.batches, args.batch_size, args.seq_len)
        out = {"model": args.model, "data": args.data, "split": args.split, "loss": loss, "ppl": perplexity(loss)}
        out["tokens"] = args.batches * args.batch_size * args.seq_len
    else:
        from lmforge.objectives.classify import Classification
        from lmforge.tasks import load_task
        from lmforge.train.recipe import TrainConfig
        from lmforge.train.task import LabelledText

        if cfg.head != "classifier":
            raise UserError(f"{args.model} has a {cfg.head!r} head; a task needs a classifier (`lmforge finetune`)")
        data = load_task(args.task, seed=args.split_seed)
        if not model.tokenizer_files or "tokenizer.json" not in model.tokenizer_files:
            raise UserError(f"{args.model} carries no tokenizer.json to encode the task with")
        tc = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size)
        task = LabelledText(data, model.tokenizer_files, tc, pad_id=cfg.pad_token_id)
        task.check_model(model)
        objective = Classification(data.kind, cfg.num_labels)
        split = "validation" if args.split == "val" else "test"
        evaluator = Evaluator(task.val_batches(args.split), args.batch_size, ONE_PROCESS)
        scores = objective.finish_validation(*evaluator.run_with_rows(lambda mb: objective.val_step(model, mb)))
        metric = f"val_{data.metric}"
        out = {"model": args.model, "task": data.name, "split": args.split, "examples": len(data.split(split))}
        out |= {data.metric: scores[metric]} if metric in scores else {}
        out |= {k.removeprefix("val_"): v for k, v in scores.items()}
    print(json.dumps(out))
    return 0

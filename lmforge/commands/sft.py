"""`lmforge sft RECIPE.yaml`: instruction fine-tuning on (query, trace, response) examples, the trace supervised too.

The recipe is lmforge's (model or train.init_from, optim, train) plus an `sft:` section (SFTConfig). A fresh model
(no train.init_from) needs a tokenizer: sft.tokenizer "chars" builds a character-level one from the training text,
or a path names a tokenizer.json; a checkpoint brings its own. The run folder is `lmforge train`'s (metrics.jsonl,
checkpoints for an exact --resume, final/ in HF form); the per-span losses and the generation scores are in
metrics.jsonl. With sft.self_train_rounds, each round samples traces for the training queries from the last model,
keeps the right ones (train/self_train.py) and trains on in OUT/roundN; its generation FLOPs are charged. The last
line printed is one JSON object: the final metrics and the whole cost.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from lmforge.errors import UserError
from lmforge.train import parallel
from lmforge.train.loop import RESUMABLE_KEYS, Trainer, run_trainer
from lmforge.train.recipe import load_recipe_sections, recipe_help


@dataclass(frozen=True)
class SFTConfig:
    data: str = ""  # addition:D, multiplication:AxB, reasoning_gym:NAME, or a .jsonl of {query, trace, response}
    train_examples: int = 1000
    val_examples: int = 200
    test_examples: int = 2000  # scored only with train.eval_test
    data_seed: int = 0  # draws the problems (generators) or shuffles the file before it is cut into splits
    trace: bool = True  # train on the trace; false: answer-only training (the baseline)
    query_weight: float = 0.0
    trace_weight: float = 1.0
    response_weight: float = 1.0
    template: str = "auto"  # auto | plain | chat (the tokenizer's chat template)
    tokenizer: str = ""  # fresh model: "chars" or a tokenizer path; "" = the checkpoint's own
    pack: bool = True  # several examples a row, attention kept inside each
    generate: bool = True  # score every evaluation by greedy generation
    max_new_tokens: int = 96
    eval_batch_size: int = 256  # validation / test rows scored (and generated) at once
    self_train_rounds: int = 0
    self_train_steps: int = 0  # optimizer steps of each round
    self_train_samples: int = 4  # completions sampled per training query
    self_train_temperature: float = 0.7
    self_train_min_trace: float = 1.0  # keep a sample whose answer is right and trace_values >= this


def _check(sc: SFTConfig) -> None:
    if not sc.data:
        raise UserError("sft.data is required: addition:D, multiplication:AxB, reasoning_gym:NAME or a .jsonl file")
    for key in ("train_examples", "val_examples"):
        if getattr(sc, key) < 1:
            raise UserError(f"sft.{key} must be >= 1, got {getattr(sc, key)}")
    if sc.test_examples < 0 or sc.max_new_tokens < 1 or sc.self_train_rounds < 0 or sc.eval_batch_size < 1:
        raise UserError("sft.test_examples >= 0, max_new_tokens >= 1, eval_batch_size >= 1, self_train_rounds >= 0")
    if min(sc.query_weight, sc.trace_weight, sc.response_weight) < 0 or sc.response_weight == 0:
        raise UserError("sft span weights must be >= 0, and the response's > 0")
    if sc.self_train_rounds and (sc.self_train_steps < 1 or sc.self_train_samples < 1 or not sc.trace):
        raise UserError("sft.self_train_rounds needs sft.trace, sft.self_train_steps >= 1 and self_train_samples >= 1")


def _check_run(recipe, sc: SFTConfig) -> None:
    if sc.self_train_rounds and not recipe.train.export_hf:
        raise UserError("sft.self_train_rounds samples from OUT/final: it needs train.export_hf true")


def _tokenizer_files(recipe, sc: SFTConfig, train_texts: list[str]) -> dict[str, bytes]:
    from lmforge.data.tokenizer_build import read_tokenizer_files
    from lmforge.train.trace_task import char_tokenizer_files

    if recipe.train.init_from:
        if sc.tokenizer:
            raise UserError("sft.tokenizer is for fresh models: a checkpoint (train.init_from) brings its own")
        return {}
    if sc.tokenizer == "chars":
        return char_tokenizer_files(train_texts)
    if not sc.tokenizer:
        raise UserError("a fresh model needs sft.tokenizer: chars, or the path of a tokenizer.json")
    return read_tokenizer_files(sc.tokenizer)


def sft_trainer(recipe, sc: SFTConfig, splits: dict, resume: bool = False, stage: str = "") -> Trainer:
    """The trainer of one stage (the main run, or a self-training round) on these splits."""
    from lmforge.objectives.trace_sft import SpanWeights, TraceSupervision
    from lmforge.tasks.traces import completion_text
    from lmforge.train.loop import model_for_recipe
    from lmforge.train.trace_task import TraceSequences, TraceTemplate

    texts = [ex.query + "".join(completion_text(ex, True)) for ex in splits["train"]]
    files = _tokenizer_files(recipe, sc, texts)
    if recipe.train.parallel == "fsdp":
        raise UserError("sft runs in one process or under DDP (train.parallel ddp), not FSDP: its scoring generates")
    model, recipe = model_for_recipe(recipe, "lm")
    if not model.config.causal:
        raise UserError(f"trace fine-tuning needs a causal language model; {recipe.train.init_from} is not causal")
    files = files or getattr(model, "tokenizer_files", None) or {}
    if "tokenizer.json" not in files:
        raise UserError(f"{recipe.train.init_from} carries no tokenizer.json, which trace fine-tuning encodes with")
    template = TraceTemplate(files, sc.template)
    if not recipe.train.init_from and template.eos_id is not None and model.config.eos_token_id is None:
        model.config = model.config.replace(eos_token_id=template.eos_id)  # an export stops generation there
    model.tokenizer_files = files
    task = TraceSequences(splits, template, recipe.train, sc.trace, sc.pack, files, sc.eval_batch_size)
    weights = SpanWeights(sc.query_weight, sc.trace_weight, sc.response_weight)
    scored = {0: splits["validation"], 1: splits["test"]}
    objective = TraceSupervision(weights, template, scored, sc.trace, sc.max_new_tokens, sc.generate)
    sections = {"sft": dataclasses.asdict(sc) | ({"stage": stage} if stage else {})}
    return Trainer(recipe, task=task, objective=objective, resume=resume, sections=sections,
                   resumable_keys=RESUMABLE_KEYS, model=model)  # fmt: skip


def run_sft(recipe, sc: SFTConfig, resume: bool = False) -> dict:
    """The main run, then each self-training round; the summary of the last, with every stage's cost summed."""
    from lmforge.tasks.traces import trace_splits

    _check(sc)
    _check_run(recipe, sc)
    if sc.test_examples == 0 and recipe.train.eval_test:
        raise UserError("train.eval_test needs sft.test_examples > 0")
    sizes = {"train": sc.train_examples, "validation": sc.val_examples, "test": sc.test_examples}
    splits = trace_splits(sc.data, sizes, sc.data_seed)
    _, summary = run_trainer(partial(sft_trainer, recipe, sc, splits, resume))
    total_flops, stages = summary["flops"], [{"stage": "sft", **_cost(summary)}]
    out = Path(recipe.train.out_dir)
    for r in range(1, sc.self_train_rounds + 1):
        last = out / ("final" if r == 1 else f"round{r - 1}/final")
        summary, stats = self_train_round(recipe, sc, splits, last, out / f"round{r}", r, resume)
        total_flops += stats["generation_flops"] + summary["flops"]
        stages.append({"stage": f"round{r}", **stats, **_cost(summary)})
    return {**summary, "flops_total": total_flops, "stages": stages}


def self_train_round(recipe, sc: SFTConfig, splits: dict, last: Path, out: Path, r: int, resume: bool = False):
    """Round r: traces sampled from the model at `last` for the training queries, the right ones kept, then
    sc.self_train_steps on the training examples plus the kept traces, into `out`. (summary, sampling stats)."""
    from lmforge.io.checkpoints import load
    from lmforge.train.self_train import sample_kept_traces
    from lmforge.train.trace_task import TraceTemplate

    model = load(last)
    kept, stats = sample_kept_traces(
        model, TraceTemplate(model.tokenizer_files, sc.template), splits["train"], sc.self_train_samples,
        sc.self_train_temperature, sc.self_train_min_trace, sc.max_new_tokens, recipe.train.seed + r,
    )  # fmt: skip
    if parallel.is_main_rank():
        print(f"self-training round {r}: kept {stats['kept']} of {stats['sampled']} sampled traces "
              f"(answers right in {stats['sample_answer_acc']:.1%})", flush=True)  # fmt: skip
    summary = continue_training(recipe, sc, {**splits, "train": splits["train"] + kept}, last, out, f"round{r}", resume)
    if parallel.is_main_rank():  # under torchrun every rank samples the same traces; one writes
        (out / "self_train.json").write_text(json.dumps(stats, indent=1) + "\n")
    return summary, stats


def continue_training(recipe, sc: SFTConfig, splits: dict, init: Path, out: Path, stage: str, resume=False) -> dict:
    """sc.self_train_steps more steps from the model at `init` on these splits (a fresh optimizer and schedule)."""
    train = replace(recipe.train, init_from=str(init), out_dir=str(out), steps=sc.self_train_steps)
    _, summary = run_trainer(partial(sft_trainer, replace(recipe, train=train), replace(sc, tokenizer=""), splits,
                                     resume, stage))  # fmt: skip
    return summary


def _cost(summary: dict) -> dict:
    return {k: summary[k] for k in ("steps", "tokens", "flops")}


def register(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="instruction fine-tuning on query / trace / response examples, the trace supervised too",
        description="Fine-tune (or train from scratch) on sft.data with separate loss weights for query, trace and "
        "response; score by generation (answer exact match, trace values); optional self-training rounds. "
        "Override any key as --section.key=value (docs/sft.md).",
    )
    p.add_argument("recipe", help=recipe_help("recipe with an sft: section", "sft-addition-cpu"))
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its checkpoints")
    p.set_defaults(func=run, accepts_overrides=True)


def load_sft_recipe(path, overrides=()):
    return load_recipe_sections(path, list(overrides), {"sft": SFTConfig})


def run(args) -> int:
    recipe, extra = load_sft_recipe(args.recipe, args.overrides)
    summary = run_sft(recipe, extra["sft"], resume=args.resume)
    final = {k: v for k, v in summary.items() if k.startswith(("val_", "test_"))}
    keys = ("steps", "tokens", "flops", "flops_total", "stages")
    if parallel.is_main_rank():
        print(json.dumps({**{k: summary[k] for k in keys}, **final}))
    return 0

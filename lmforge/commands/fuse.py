"""`lmforge fuse SRC --out DST`: a smaller model made from a larger one (lmforge.surgery.fuse), plus the
baselines it is measured against, all through one command so they share calibration and evaluation:

    --method fuse     dimension-then-layer fusion (the method)
    --method prune    Minitron-style: keep the most important channels, drop the least influential layers
    --method prune-refit  pruning's choice, its writers refitted as fusion refits them
    --method prune-map    the same, with the hidden map chosen by fusion's search
    --method drop     ShortGPT-style layer dropping only, to about the same parameter count
    --method random   the same small architecture from random initialisation

Calibration tokens come from the train split of a token dataset built with SRC's tokenizer (`lmforge data
--tokenizer SRC`); the run ends with one JSON line, which for a model with an LM head holds the one-shot
validation loss and perplexity of SRC and of DST on the dataset's validation split (an encoder such as BERT is
fused the same way; its quality is measured downstream). Recovery training against SRC is `lmforge distill`
(recipes/fuse-recover-cpu.yaml).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from lmforge.commands.grow import add_size_flags, size_args
from lmforge.data.tokens import BatchSampler, TokenDataset, check_tokenizer_matches
from lmforge.errors import UserError
from lmforge.io.atomic import refuse_output_over_input
from lmforge.io.checkpoints import model_from_tensors, read_checkpoint, save_lmforge
from lmforge.io.hf_tensors import save_hf
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import param_count
from lmforge.model.transformer import Transformer
from lmforge.objectives.lm import perplexity, split_loss
from lmforge.surgery.fuse import METHODS as SURGERY_METHODS
from lmforge.surgery.fuse import drop_layers, fuse, target_config

METHODS = (*SURGERY_METHODS, "drop", "random")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fuse",
        help="make a smaller model from a larger one by fusing its weights (or a baseline: prune, drop, random)",
        description="Fuse SRC (HF folder, lmforge folder or .gguf) into a smaller model at DST: channels, heads and "
        "neurons merged by their activations on calibration text, then neighbouring layers merged; see "
        "lmforge/surgery/fuse.py. Sizes not given stay the source's (heads follow --hidden at fixed head_dim).",
    )
    p.add_argument("src", help="checkpoint to fuse")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    add_size_flags(p)
    p.add_argument("--method", choices=METHODS, default="fuse", help="fuse (default) or a baseline")
    p.add_argument("--data", required=True, help="token dataset built with SRC's tokenizer (`lmforge data`)")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences from the train split (32)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation sequence length (256)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches of 8 sequences (4; 0 = none)")
    p.add_argument(
        "--ridge",
        type=_ridge,
        default=None,
        help="ridge of the least-squares writer refits toward the summed writers, relative to the mean activation"
        " energy (default: auto, chosen per refit on held-out calibration tokens)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of --method random")
    p.add_argument("--format", choices=("hf", "lmforge"), default="hf", help="form of DST (default: hf)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    p.set_defaults(func=run)


def _ridge(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a non-negative number")
    return value


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    refuse_output_over_input(args.src, args.out)
    for flag in ("calib_seqs", "seq_len"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.eval_batches < 0:
        raise UserError("--eval-batches must not be negative")
    cfg, tensors, side = read_checkpoint(args.src)
    train = TokenDataset(args.data, "train")
    check_tokenizer_matches(train.manifest, cfg.vocab_size, side)
    if cfg.position == "learned" and args.seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    sizes = size_args(args)
    target_config(cfg, **sizes)  # bad sizes fail here, before anything is loaded
    state = dict(tensors)
    calib_ids = BatchSampler(train, args.calib_seqs, args.seq_len, args.seed).next_batch()[0]  # (B, T)

    bar = tqdm(desc=args.method, unit="unit", leave=False, dynamic_ncols=True)

    def progress(msg: str, done: int, total: int) -> None:  # units differ in cost: the ETA is rough
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix_str(msg)

    if args.method in SURGERY_METHODS:
        cfg_t, out, report = fuse(
            cfg, state, calib_ids, **sizes, method=args.method, ridge=args.ridge, progress=progress
        )
    elif args.method == "drop":
        cfg_t, out, report = drop_layers(cfg, state, calib_ids, _drop_depth(cfg, sizes))
    else:
        cfg_t = target_config(cfg, **sizes)
        model = Transformer(cfg_t)
        model.init_weights(generator=torch.Generator().manual_seed(args.seed))
        dtype = next(iter(state.values())).dtype
        out = {
            k: v.to(dtype)
            for k, v in model.state_dict().items()
            if not (cfg_t.tie_embeddings and k == "lm_head.weight")
        }
        report = {"method": "random", "source_params": param_count(cfg), "target_params": param_count(cfg_t)}
    bar.close()
    report["seconds_surgery"] = round(time.perf_counter() - start, 2)

    if args.eval_batches and cfg.head == "lm":  # one-shot quality, before DST is written (a failure writes nothing)
        val, n = TokenDataset(args.data, "val"), args.eval_batches
        report["source_val_loss"] = split_loss(model_from_tensors(cfg, state.items()), val, n, 8, args.seq_len)
        report["val_loss"] = split_loss(model_from_tensors(cfg_t, out.items()), val, n, 8, args.seq_len)
        report["source_ppl"] = perplexity(report["source_val_loss"])
        report["ppl"] = perplexity(report["val_loss"])
        report["ppl_ratio"] = report["ppl"] / report["source_ppl"]
    del state
    save = save_hf if args.format == "hf" else save_lmforge
    summary = save(cfg_t, out.items(), args.out, side, overwrite=args.overwrite)
    report["param_ratio"] = report["target_params"] / report["source_params"]
    report["seconds"] = round(time.perf_counter() - start, 2)
    print(
        f"{args.method}: {args.src} -> {args.out} ({args.format}): {_shape(cfg)} -> {_shape(cfg_t)}; "
        f"{report['source_params']:,} -> {report['target_params']:,} parameters ({report['param_ratio']:.0%}), "
        f"{summary.files} file(s)"
        + (f"; val ppl {report['source_ppl']:.2f} -> {report['ppl']:.2f}" if "ppl" in report else "")
    )
    print(json.dumps(report))
    return 0


def _shape(cfg: ModelConfig) -> str:
    return f"{cfg.num_layers}L x {cfg.hidden_size} (FFN {cfg.ffn_size}, heads {cfg.num_heads}/{cfg.n_kv_heads})"


def _drop_depth(cfg: ModelConfig, sizes: dict) -> int:
    """Layer dropping keeps the width, so it keeps the number of layers whose parameter count is closest to the
    target's (at least 1); with only --layers given, that number."""
    if all(v is None for k, v in sizes.items() if k != "layers"):
        return sizes["layers"] or cfg.num_layers
    goal = param_count(target_config(cfg, **sizes))
    return min(range(1, cfg.num_layers + 1), key=lambda n: abs(param_count(cfg.replace(num_layers=n)) - goal))

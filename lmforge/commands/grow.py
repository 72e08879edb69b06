"""`lmforge grow SRC --out DST`: a larger model initialised from a smaller trained one (lmforge.surgery.grow).

Tensors stream from SRC through the growth map into DST one at a time (each target tensor is made from one
source tensor), so memory holds about one tensor, not the model. `--check` then loads both models and
prints one JSON line comparing their outputs on held-out text.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.io.atomic import refuse_output_over_input
from lmforge.io.checkpoints import load, read_checkpoint, save_lmforge
from lmforge.io.hf_tensors import save_hf
from lmforge.model.config import ModelConfig
from lmforge.surgery.grow import MODES, NOISES, check, exactness, grow
from lmforge.surgery.grow_depth import DEPTHS

# Held-out text for --check when the checkpoint has a tokenizer (written for this purpose, in no corpus).
HELD_OUT_TEXT = (
    "The lighthouse keeper counted the ships that passed each evening and wrote their names in a small green "
    "book. When the fog came in from the east, he lit the lamp an hour early and listened for the bells of the "
    "fishing boats. Most nights nothing happened at all, and he liked it that way: the sea was loud enough for "
    "both of them. In the spring his niece arrived with a crate of seeds, a bicycle with one working brake, and "
    "the firm opinion that a lighthouse ought to have a garden. By midsummer the rocks below the tower were "
    "covered in beans, and the ships, he noticed, slowed down to look."
)
CHECK_TOKENS = 256


SIZES = {
    "hidden": "hidden size",
    "ffn": "FFN size",
    "heads": "attention heads",
    "kv_heads": "KV heads (GQA)",
    "layers": "layers",
}


def add_size_flags(p: argparse.ArgumentParser) -> None:
    """--hidden, --ffn, --heads, --kv-heads, --layers: a target's sizes (grow and fuse); None = the source's."""
    for name, what in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"target {what}")


def size_args(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name) for name in SIZES}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "grow",
        help="grow a checkpoint wider and/or deeper, keeping its outputs (function-preserving init)",
        description="Grow SRC (a Hugging Face folder, an lmforge folder or a .gguf file) into a larger model at "
        "DST whose outputs start equal to SRC's. Sizes not given follow the hidden size: the FFN scales by its "
        "factor (rounded); heads become hidden / head_dim when that is a whole number (head_dim is kept), else stay as "
        "they are (576 -> 864 with 9 heads of 64 keeps 9 heads: 13.5 is impossible; give --heads); KV heads keep the "
        "query heads per KV head when they can. Exact in float32 for pre-norm models; docs/growth.md says when else.",
    )
    p.add_argument("src", help="checkpoint to grow")
    p.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --overwrite)")
    add_size_flags(p)
    p.add_argument(
        "--mode",
        choices=MODES,
        default="clone",
        help="clone: duplicate dims/neurons/heads; zero: pad with new ones (default: clone)",
    )
    p.add_argument(
        "--depth",
        choices=DEPTHS,
        default="interleave",
        help="where new layers go: interleave (evenly), top, bottom, or stack (G_stack copies, not "
        "function preserving) (default: interleave)",
    )
    p.add_argument(
        "--noise-snr-db",
        type=float,
        default=None,
        help="symmetry-breaking noise on weights reading duplicated inputs, signal-to-noise in dB",
    )
    p.add_argument(
        "--noise",
        choices=NOISES,
        default="cancel",
        help="cancel: sums to zero over copies, outputs unchanged; plain: independent (default: cancel)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random new weights and the noise")
    p.add_argument("--format", choices=("hf", "lmforge"), default="hf", help="form of DST (default: hf)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
    p.add_argument(
        "--check",
        action="store_true",
        help="run SRC and DST on held-out text and print one JSON line comparing their outputs",
    )
    p.add_argument("--check-text", default=None, help="text file for --check (default: a built-in paragraph)")
    p.add_argument(
        "--optimizer-state",
        action="store_true",
        help="SRC is a training checkpoint (a run folder or checkpoints/step_N): grow its AdamW moments through the "
        "same map into DST/optimizer_state.pt (lmforge.surgery.grow_optim)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    refuse_output_over_input(args.src, args.out)
    if args.check_text is not None and not Path(args.check_text).is_file():
        raise UserError(f"--check-text {args.check_text} is not a file")
    trained = None
    if args.optimizer_state:  # a training checkpoint: weights, AdamW state, step
        from lmforge.surgery.grow_optim import read_training_checkpoint

        trained = read_training_checkpoint(args.src)
        cfg, tensors, side = trained.config, trained.model_state, trained.tokenizer_files
    else:
        cfg, tensors, side = read_checkpoint(args.src)
    cfg_t, out = grow(
        cfg,
        tensors,
        **size_args(args),
        mode=args.mode,
        depth=args.depth,
        noise_snr_db=args.noise_snr_db,
        noise=args.noise,
        seed=args.seed,
    )
    if trained is not None:  # grown before DST is written, which then holds it as one more file (atomically)
        from lmforge.surgery.grow_optim import OPTIMIZER_STATE_FILE, grow_optimizer_state, optimizer_state_bytes

        _, moments = grow_optimizer_state(
            cfg, trained.optimizer_state, **size_args(args), mode=args.mode, depth=args.depth
        )
        side = {**side, OPTIMIZER_STATE_FILE: optimizer_state_bytes(moments, trained.step)}
        del moments
    first = next(out, None)
    if first is None:  # a model has tensors; an empty stream means the source had none
        raise UserError(f"{args.src} holds no tensors")
    out = itertools.chain([first], out)
    del first  # the stream holds it until it is written, no longer
    if args.format == "hf":
        summary = save_hf(cfg_t, out, args.out, side, overwrite=args.overwrite)  # streams: memory ~ one tensor
    else:
        summary = save_lmforge(cfg_t, out, args.out, side, overwrite=args.overwrite)
    sizes = " ".join(
        f"{k} {a}->{b}"
        for k, a, b in (
            ("hidden", cfg.hidden_size, cfg_t.hidden_size),
            ("ffn", cfg.ffn_size, cfg_t.ffn_size),
            ("heads", f"{cfg.num_heads}/{cfg.n_kv_heads}", f"{cfg_t.num_heads}/{cfg_t.n_kv_heads}"),
            ("layers", cfg.num_layers, cfg_t.num_layers),
        )
    )
    noise = args.noise if args.noise_snr_db is not None else None
    print(
        f"grew {args.src} -> {args.out} ({args.format}, {args.mode}): {cfg.family}, {sizes}; "
        f"{exactness(cfg, cfg_t, args.mode, args.depth, noise, summary.dtype)}; {summary.params:,} parameters in "
        f"{summary.files} file(s), {summary.dtype}, {time.perf_counter() - start:.1f} s"
    )
    if args.check:
        src_model = trained.model_state if trained is not None else None
        print(json.dumps(_check(args, cfg, cfg_t, side, src_model)))
    return 0


def _check_ids(cfg: ModelConfig, side: dict[str, bytes], text_file: str | None) -> tuple[torch.Tensor, str]:
    """(input ids (1, T), what they are): the checkpoint's tokenizer on held-out text, else random ids."""
    limit = min(CHECK_TOKENS, cfg.max_seq_len)
    if "tokenizer.json" in side:
        from lmforge.data.tokenizer import Tokenizer

        text = Path(text_file).read_text(encoding="utf-8", errors="replace") if text_file else HELD_OUT_TEXT
        ids = Tokenizer.from_files(side).encode(text)[:limit]
        if len(ids) >= 2 and max(ids) < cfg.vocab_size:
            return torch.tensor([ids]), f"held-out text, {len(ids)} tokens"
    ids = torch.randint(0, cfg.vocab_size, (1, limit), generator=torch.Generator().manual_seed(0))
    return ids, f"random ids, {limit} tokens (no usable tokenizer in the checkpoint)"


def _check(
    args: argparse.Namespace, cfg: ModelConfig, cfg_t: ModelConfig, side: dict[str, bytes], src_model=None
) -> dict:
    ids, what = _check_ids(cfg, side, args.check_text)
    # float32: the models may be large; exact growths measure ~1e-7 here (float64 gives ~1e-15 in the tests).
    src = src_model if src_model is not None else load(args.src)  # a training checkpoint's state, or a checkpoint
    result = check(cfg, src, cfg_t, load(args.out), ids, dtype=torch.float32)
    return {**result, "input": what, "dtype": "float32"}

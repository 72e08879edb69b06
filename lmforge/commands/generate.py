"""`lmforge generate MODEL --prompt TEXT`: sampled or greedy text from any checkpoint."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lmforge.errors import UserError
from lmforge.model.generate import check_sampling, stream


# ---- the command ---------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a model",
        description="Continue --prompt with MODEL (an HF folder, an lmforge folder, a .gguf file or pkg:NAME that "
        "carries its tokenizer), printing tokens as they come, then tokens/s on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="sample among the smallest set holding this mass")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (None: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.io.checkpoints import load

    top_k = args.top_k or None
    check_sampling(args.max_new_tokens, args.temperature, top_k, args.top_p)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device!r}: {e}") from None
    model = load(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    if model.config.head != "lm" or not model.config.causal:  # checked before anything is printed
        what = "an encoder" if not model.config.causal else f"a {model.config.head!r} head"
        raise UserError(f"{args.model} is {what}: generate needs a causal model with a language-model head")
    files = getattr(model, "tokenizer_files", None) or {}
    if "tokenizer.json" not in files:
        raise UserError(f"{args.model} carries no tokenizer.json; generate needs the model's tokenizer")
    tok = Tokenizer.from_files(files)
    ids = tok.encode(args.prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    if max(ids) >= model.config.vocab_size:
        raise UserError(
            f"the tokenizer gives id {max(ids)}, beyond the model's vocabulary of {model.config.vocab_size}"
        )
    eos = tok.eos_id if tok.eos_id is not None else model.config.eos_token_id
    generator = torch.Generator(device).manual_seed(args.seed)
    steps = stream(
        model,
        torch.tensor([ids]),
        args.max_new_tokens,
        args.temperature,
        top_k,
        args.top_p,
        args.greedy,
        eos,
        generator,
    )
    out = sys.stdout
    t0 = time.perf_counter()
    out.write(args.prompt)
    out.flush()
    new: list[int] = []
    shown = ""
    for token in steps:
        if eos is not None and int(token[0]) == eos:
            break
        new.append(int(token[0]))
        text = tok.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for its remaining bytes
            continue
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    out.write(tok.decode(new, skip_special_tokens=True)[len(shown) :] + "\n")  # a cut character at the very end
    out.flush()
    seconds = time.perf_counter() - t0
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0

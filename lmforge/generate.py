"""Autoregressive decoding with the model's KV cache, and the `lmforge generate` command.

The prompt goes through the model once (prefill) and fills the cache; after that each step feeds
one token per row, so a step costs one token's worth of compute instead of the whole sequence.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.model import KVCache, Transformer


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token (B,) from last-position logits (B, V). temperature 0 is greedy."""
    logits = logits.float()
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        # The most likely token is always kept (mass before it is 0).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream(
    model: Transformer,
    ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), one step at a time (see `generate`)."""
    cfg = model.config
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if cfg.head != "lm" or not cfg.causal:
        raise UserError(
            f"generation needs a causal language model; this one has head={cfg.head!r}, causal={cfg.causal}"
        )
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise UserError(f"prompt ids must be (batch, length >= 1), got shape {list(ids.shape)}")
    B, T = ids.shape
    if cfg.position == "learned" and T + max_new_tokens > cfg.max_seq_len:
        raise UserError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's {cfg.max_seq_len} learned positions"
        )
    if max_new_tokens == 0:
        return
    param = next(model.parameters())
    ids = ids.to(param.device)
    cache = KVCache.empty(cfg, B, T + max_new_tokens, param.device, param.dtype)
    logits = model(ids, cache=cache)[:, -1]  # prefill: (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=param.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, greedy, generator)  # (B,)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)  # a finished row only repeats eos
            done |= token == eos_id
        yield token
        if (eos_id is not None and bool(done.all())) or step + 1 == max_new_tokens:
            return
        logits = model(token[:, None], cache=cache)[:, -1]  # (B, V)


def generate(
    model: Transformer,
    ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ids (B, T) -> (B, T + n), n <= max_new_tokens: the prompt followed by what the model wrote.

    Sampling at `temperature` from the `top_k` most likely tokens and/or the smallest set holding `top_p`
    of the mass; `greedy` (or temperature 0) takes the argmax. Rows that produce `eos_id` keep repeating it,
    and decoding stops once every row has. `generator` makes sampling reproducible."""
    steps = list(stream(model, ids, max_new_tokens, temperature, top_k, top_p, greedy, eos_id, generator))
    ids = ids.to(next(model.parameters()).device)
    return torch.cat([ids, torch.stack(steps, dim=1)], dim=1) if steps else ids


# ---- the command ---------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a model",
        description="Continue --prompt with MODEL (an HF folder, an lmforge folder or a .gguf "
        "file that carries its tokenizer), printing tokens as they come.",
    )
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="sample among the smallest set holding this mass")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.api import load
    from lmforge.tokenizer import Tokenizer

    top_k = args.top_k or None
    check_sampling(args.max_new_tokens, args.temperature, top_k, args.top_p)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device!r}: {e}") from None
    model = load(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
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
    return 0

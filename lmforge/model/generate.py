"""Autoregressive decoding with the model's KV cache, and the `lmforge generate` command.

The prompt goes through the model once (prefill) and fills the cache; after that each step feeds
one token per row, so a step costs one token's worth of compute instead of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.model.transformer import KVCache, Transformer


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


def sample_text(
    model: Transformer, tokenizer_files: dict[str, bytes] | None, prompts, max_new: int, seed: int
) -> list[str]:
    """A few sampled continuations (temperature 0.8, top-k 50) so a person can read the model."""
    if not tokenizer_files or not prompts or max_new <= 0:
        return []
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.model.generate import generate

    tok = Tokenizer.from_files(tokenizer_files)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
        new = generate(model, ids, max_new, temperature=0.8, top_k=50, eos_id=tok.eos_id, generator=gen)
        out.append(prompt + tok.decode(new[0, ids.shape[1] :].tolist()))
    return out

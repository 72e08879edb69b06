"""Calibration: what fusion and pruning measure by running the source model on a few thousand real tokens.

One forward pass with hooks records, in float32 on the CPU:
- every block's attention input (B, T, C) and attention output, MLP input and MLP output (N = B * T rows);
- the residual stream between blocks, x_0 .. x_L (block influence and layer fusion);
- over every norm's output (what the residual's readers see): the Gram matrix (C, C) of the hidden channels
  and their mean absolute value (Minitron's importance); for RMSNorm also the Gram matrix of the normalised
  stream before the gain, x / rms(x) (what a norm with its gain folded into the readers outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.model.transformer import Attention, RMSNorm, Transformer


@dataclass
class Calibration:
    ids: Tensor  # (B, T) the calibration tokens
    hidden: list[Tensor]  # L + 1 of (N, C): x_0 (embeddings) .. x_L (last block's output)
    attn_in: list[Tensor]  # L of (B, T, C): the input each block's attention module received
    attn_out: list[Tensor]  # L of (N, C): the attention module's output (o_proj applied, bias included)
    mlp_in: list[Tensor]  # L of (N, C)
    mlp_out: list[Tensor]  # L of (N, C)
    stream_gram: Tensor  # (C, C) float64: sum over norm outputs of x x^T
    stream_abs: Tensor  # (C,) float64: mean |norm output| per channel
    unit_gram: Tensor  # (C, C) float64: sum over RMSNorm inputs of u u^T, u = x / rms(x) (zero without RMSNorm)
    final_unit_gram: Tensor  # (C, C) float64: the same at the final norm alone

    def block_influence(self, first: int = 0, last: int | None = None) -> float:
        """1 - mean cosine between the stream entering block `first` and leaving block `last` (ShortGPT's BI):
        how much those blocks change the residual stream."""
        last = first if last is None else last
        a, b = self.hidden[first].double(), self.hidden[last + 1].double()
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


@torch.no_grad()
def calibrate(model: Transformer, ids: Tensor) -> Calibration:
    """Run `model` (float32, CPU, eval) on ids (B, T) and record the statistics above."""
    model.eval()
    C = model.config.hidden_size
    attn_in, attn_out, mlp_in, mlp_out = [], [], [], []
    gram = torch.zeros(C, C, dtype=torch.float64)
    unit = torch.zeros(C, C, dtype=torch.float64)
    final_unit = torch.zeros(C, C, dtype=torch.float64)
    absum = torch.zeros(C, dtype=torch.float64)
    rows = 0

    def on_norm(m: nn.Module, args, out: Tensor) -> None:
        nonlocal gram, unit, final_unit, absum, rows
        x = out.reshape(-1, C).double()
        gram += x.T @ x
        absum += x.abs().sum(0)
        rows += x.shape[0]
        if isinstance(m, RMSNorm):
            u = args[0].reshape(-1, C).double()
            u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + m.eps)
            unit += u.T @ u
            if m is model.norm:
                final_unit += u.T @ u

    hooks = [m.register_forward_hook(on_norm) for m in model.modules() if isinstance(m, nn.LayerNorm | RMSNorm)]
    for block in model.layers:
        hooks.append(block.attn.register_forward_pre_hook(lambda _m, args: attn_in.append(args[0].clone())))
        hooks.append(block.attn.register_forward_hook(lambda _m, _a, out: attn_out.append(out.flatten(0, 1))))
        hooks.append(block.mlp.register_forward_pre_hook(lambda _m, args: mlp_in.append(args[0].flatten(0, 1))))
        hooks.append(block.mlp.register_forward_hook(lambda _m, _a, out: mlp_out.append(out.flatten(0, 1))))
    try:
        _, states = model(ids, return_states=True)
    finally:
        for h in hooks:
            h.remove()
    return Calibration(
        ids=ids,
        hidden=[x.flatten(0, 1) for x in states["hidden"]],
        attn_in=attn_in,
        attn_out=attn_out,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        stream_gram=gram,
        stream_abs=absum / max(rows, 1),
        unit_gram=unit,
        final_unit_gram=final_unit,
    )


@torch.no_grad()
def head_outputs(model: Transformer, attn: Attention, x: Tensor) -> Tensor:
    """(N, H, D): each head's output (before o_proj) when `attn` runs on x (B, T, C) at positions 0..T-1."""
    B, T, _ = x.shape
    rope = model.rope(torch.arange(T), x.dtype)
    mask, is_causal = model._mask(T, 0, None, x.device)
    seen: list[Tensor] = []
    hook = attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        attn(x, rope, mask, is_causal)
    finally:
        hook.remove()
    return seen[0].reshape(B * T, attn.n_heads, attn.d)

"""Depth growth: where new blocks go, and what makes each one an identity.

Pre-norm (Llama, GPT-2): a block with o_proj and down_proj (and their biases) zero adds nothing to the
residual stream, so it is an exact identity whatever its other weights; those are copied from the
neighbouring block so the new block starts somewhere sensible and can learn (LLaMA-Pro's block expansion).

Post-norm (BERT): the same block computes y = LN_m(LN_a(x)), which is not x: x is the output of the previous
LayerNorm, gamma * xhat + beta, and its mean and variance depend on gamma and the input. What is (almost)
exact: move the previous LayerNorm's affine (gamma, beta) to the end of the new block. The previous LayerNorm
(the last one of the block before, or the embedding LayerNorm) becomes plain normalisation (1, 0), the new
block's attn_norm is (1, 0) too, and its mlp_norm takes the old (gamma, beta). Then the new block sees
xhat = z / sqrt(v + eps) (z the centred input, v its variance), normalises it twice more and applies gamma,
beta: the result is gamma * xhat * F + beta with F^-2 = w (1 + eps) + eps^2, w = v / (v + eps). F = 1 up to
about eps * |1/v - 1| / 2: ~1e-12 with BERT's eps = 1e-12, ~1e-6 for eps = 1e-5 and v near 1.
A run of several new blocks keeps (1, 0) everywhere except the last block's mlp_norm.

G_stack ("stack"): the whole stack repeated (layer j copies layer j mod L). Not function preserving.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import UserError

DEPTHS = ("interleave", "top", "bottom", "stack")
# Residual writers of a block: zero in a new block, which then adds nothing to the residual stream.
ZEROED = ("attn.o_proj.weight", "attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


@dataclass(frozen=True)
class Slot:
    """One target layer: a copy of source layer `src`; `new` blocks are identities (not in G_stack)."""

    src: int
    new: bool


def layout(l_s: int, l_t: int, depth: str) -> list[Slot]:
    """Target layers in order. interleave: the new blocks spread evenly, each right after the source layer
    it copies (after every 2nd layer for 30 -> 45); top: all after the last; bottom: all before the first."""
    m = l_t - l_s
    if depth == "stack":
        return [Slot(j % l_s, False) for j in range(l_t)]
    if depth == "top":
        return [Slot(i, False) for i in range(l_s)] + [Slot(l_s - 1, True)] * m
    if depth == "bottom":
        return [Slot(0, True)] * m + [Slot(i, False) for i in range(l_s)]
    if depth != "interleave":
        raise UserError(f"depth placement {depth!r} is not one of {DEPTHS}")
    out = []
    for i in range(l_s):
        out.append(Slot(i, False))
        out += [Slot(i, True)] * ((i + 1) * m // l_s - i * m // l_s)
    return out


@dataclass(frozen=True)
class PostNormPlan:
    """For a post-norm model: which LayerNorms become plain normalisation (1, 0), and which new mlp_norm takes
    which old LayerNorm's affine. Norm prefixes are target names: "embed.norm", "layers.{j}.mlp_norm"."""

    plain: frozenset[str]  # target norm prefixes set to (1, 0)
    moved: dict[str, str]  # target norm prefix -> source norm prefix whose (gamma, beta) it takes


def post_norm_plan(slots: list[Slot], embed_norm: bool) -> PostNormPlan:
    plain: set[str] = set()
    moved: dict[str, str] = {}
    j = 0
    while j < len(slots):
        if not slots[j].new:
            j += 1
            continue
        start = j
        while j < len(slots) and slots[j].new:
            j += 1
        if start == 0:
            if not embed_norm:
                raise UserError(
                    "cannot add identity blocks below the first layer of a post-norm model without an "
                    "embedding LayerNorm (use --depth interleave or top)"
                )
            anchor_tgt = anchor_src = "embed.norm"
        else:
            anchor_tgt = f"layers.{start - 1}.mlp_norm"
            anchor_src = f"layers.{slots[start - 1].src}.mlp_norm"
        plain.add(anchor_tgt)
        for k in range(start, j):
            plain.add(f"layers.{k}.attn_norm")
            if k < j - 1:
                plain.add(f"layers.{k}.mlp_norm")
        moved[f"layers.{j - 1}.mlp_norm"] = anchor_src
    return PostNormPlan(frozenset(plain), moved)

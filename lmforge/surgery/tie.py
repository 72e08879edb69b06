"""Layer sharing as pure functions: which layers share, and a state dict whose shared layers are made equal.

    groups = sharing_groups(12, "consecutive", 4)   # [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    state = tie_state(state, groups, parts=("attn", "mlp", "norms"), rule="mean")

A shared model here is an ordinary model whose layers within a group hold equal tensors (the parts shared): it
exports, loads and caches like any other, one copy per layer position. Training keeps the copies equal by giving each
the group's mean gradient (lmforge/train/sharing.py); `lmforge tie` makes a trained model shared with tie_state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.errors import UserError

GROUPINGS = ("none", "all", "consecutive", "cycle")
# The parts of a block that can be shared, by the prefix of its parameter names inside the block.
PARTS = {"attn": ("attn.",), "mlp": ("mlp.",), "norms": ("attn_norm.", "mlp_norm.")}


def sharing_groups(num_layers: int, grouping: str, size: int = 0) -> list[list[int]]:
    """The groups of layers that share one unit, each of at least 2 layers (a lone layer shares nothing).

    all: every layer shares one unit. consecutive: blocks of `size` consecutive layers (the last may be shorter).
    cycle: `size` units used in turn, layer i using unit i mod size (ALBERT-style cross-layer cycles)."""
    if grouping not in GROUPINGS:
        raise UserError(f"share.groups must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    if grouping in ("consecutive", "cycle") and not 1 <= size <= num_layers:
        raise UserError(f"share.size must be between 1 and the {num_layers} layers for {grouping}, got {size}")
    if grouping == "none":
        groups: list[list[int]] = []
    elif grouping == "all":
        groups = [list(range(num_layers))]
    elif grouping == "consecutive":
        groups = [list(range(i, min(i + size, num_layers))) for i in range(0, num_layers, size)]
    else:
        groups = [list(range(u, num_layers, size)) for u in range(size)]
    return [g for g in groups if len(g) > 1]


def check_parts(parts) -> tuple[str, ...]:
    parts = tuple(parts)
    if not parts or set(parts) - set(PARTS):
        raise UserError(f"share.parts must be a non-empty list of {', '.join(PARTS)}, got {list(parts)}")
    return parts


def shared_names(layer_names: list[str], parts: tuple[str, ...]) -> list[str]:
    """The names inside a block (e.g. "attn.q_proj.weight") of the parameters that are shared."""
    prefixes = tuple(p for part in parts for p in PARTS[part])
    return [n for n in layer_names if n.startswith(prefixes)]


def block_names(state: dict[str, Tensor], layer: int = 0) -> list[str]:
    head = f"layers.{layer}."
    return [k.removeprefix(head) for k in state if k.startswith(head)]


def tie_state(
    state: dict[str, Tensor], groups: list[list[int]], parts: tuple[str, ...], rule: str = "mean"
) -> dict[str, Tensor]:
    """A new state dict in which every shared tensor of each group's layers equals the group's mean (rule "mean",
    for a trained model: the unit closest to all of them in L2) or its first layer's (rule "first", for a fresh
    random initialisation, whose mean would shrink the weights by 1/sqrt(n)). Other tensors are the same objects."""
    if rule not in ("mean", "first"):
        raise UserError(f"tie rule must be mean or first, got {rule!r}")
    out = dict(state)
    names = shared_names(block_names(state), check_parts(parts))
    for group in groups:
        for name in names:
            keys = [f"layers.{i}.{name}" for i in group]
            if rule == "first":
                unit = state[keys[0]]
            else:
                unit = torch.stack([state[k].float() for k in keys]).mean(0).to(state[keys[0]].dtype)
            for k in keys:
                out[k] = unit.clone()
    return out


def unique_parameters(state: dict[str, Tensor], groups: list[list[int]], parts: tuple[str, ...]) -> int:
    """Parameters counted once per shared unit: what a tied model stores."""
    total = sum(t.numel() for t in state.values())
    names = shared_names(block_names(state), parts)
    per_layer = sum(state[f"layers.0.{n}"].numel() for n in names)
    return total - sum(len(g) - 1 for g in groups) * per_layer

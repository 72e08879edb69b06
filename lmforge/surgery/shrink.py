"""Shallower students made from a teacher's layers, as pure functions over (config, state dict).

    merge_groups(cfg, state, group=2)   # Huang et al. 2023: each group of `group` consecutive layers becomes one
    every_other(cfg, state, layers=3)   # DistilBERT / PKD: keep evenly spaced layers

merge_groups: student layer i stands for teacher layers [g*i, g*i + g). Its attention (q, k, v, o and the norm that
belongs to attention) is copied from one layer of the group (`attention_from`, 0 = the group's first: the paper's
"odd layer" counted from 1) and is frozen during distillation; its feed-forward part (MLP and its norm) starts from
another (`ffn_from`, default the group's last, the one whose output the student layer must reproduce) and is
trained, by a feature loss against the teacher's output of the group's last layer. The report names the frozen
tensors and the layer map (student layer i -> teacher layer g*i + g - 1) that distillation needs.

every_other: the student keeps `layers` teacher layers spread evenly (the last one always), untouched; its layer
map points each at the teacher layer it came from. Embeddings, final norm, pooler and classifier are the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import expected_shapes, param_count

ATTENTION = ("attn.", "attn_norm.")  # parameter names inside a block: attention and its norm
FFN = ("mlp.", "mlp_norm.")


def _block(state: Mapping[str, Tensor], layer: int, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    head = f"layers.{layer}."
    return {
        k.removeprefix(head): v for k, v in state.items() if k.startswith(head) and k[len(head) :].startswith(prefixes)
    }


def _assemble(cfg: ModelConfig, state: Mapping[str, Tensor], blocks: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The student's state: the teacher's tensors outside the blocks, then block i from blocks[i]."""
    out = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for i, block in enumerate(blocks):
        out.update({f"layers.{i}.{k}": v.clone() for k, v in block.items()})
    tgt = cfg.replace(num_layers=len(blocks))
    missing = set(expected_shapes(tgt)) - set(out) - ({"lm_head.weight"} if tgt.tie_embeddings else set())
    if missing:
        raise UserError(f"student state misses {sorted(missing)[0]}")
    return out


def merge_groups(
    cfg: ModelConfig, state: Mapping[str, Tensor], group: int = 2, attention_from: int = 0, ffn_from: int | None = None
) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """(student config, student state, report with "layer_map" and "frozen")."""
    ffn_from = group - 1 if ffn_from is None else ffn_from
    if group < 2 or cfg.num_layers % group:
        raise UserError(f"--group {group} must be >= 2 and divide the teacher's {cfg.num_layers} layers")
    if not (0 <= attention_from < group and 0 <= ffn_from < group):
        raise UserError(f"--attention-from and --ffn-from must be layers of a group, 0..{group - 1}")
    n = cfg.num_layers // group
    blocks = [
        _block(state, group * i + attention_from, ATTENTION) | _block(state, group * i + ffn_from, FFN)
        for i in range(n)
    ]
    tgt = cfg.replace(num_layers=n)
    out = _assemble(cfg, state, blocks)
    frozen = [k for k in out if k.startswith("layers.") and k.split(".", 2)[2].startswith(ATTENTION)]
    report = {
        "method": "merge-groups",
        "groups": [list(range(group * i, group * i + group)) for i in range(n)],
        "layer_map": [group * i + group - 1 for i in range(n)],
        "frozen": frozen,
        "source_params": param_count(cfg),
        "target_params": param_count(tgt),
    }
    return tgt, out, report


def every_other(
    cfg: ModelConfig, state: Mapping[str, Tensor], layers: int
) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """Keep `layers` evenly spaced teacher layers, the last among them (6 -> 3 keeps 1, 3, 5: PKD-skip)."""
    if not 0 < layers < cfg.num_layers:
        raise UserError(f"--layers {layers} must be between 1 and the teacher's {cfg.num_layers - 1}")
    keep = [round((i + 1) * cfg.num_layers / layers) - 1 for i in range(layers)]
    tgt = cfg.replace(num_layers=layers)
    out = _assemble(cfg, state, [_block(state, j, ATTENTION + FFN) for j in keep])
    report = {
        "method": "every-other",
        "layer_map": keep,
        "frozen": [],
        "source_params": param_count(cfg),
        "target_params": param_count(tgt),
    }
    return tgt, out, report


def encoder_params(cfg: ModelConfig) -> int:
    """Parameters of the transformer blocks alone (no embeddings, pooler or head): the other way to count size."""
    return sum(math.prod(shape) for name, shape in expected_shapes(cfg).items() if name.startswith("layers."))

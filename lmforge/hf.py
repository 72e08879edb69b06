"""Hugging Face <-> lmforge tensors: name maps, streaming safetensors read and write (config.json: hf_config.py).

Reading never holds more than one tensor beyond what the caller keeps: headers are checked first (names,
shapes, dtypes against the config, with `safe_open`), then each tensor is read with a plain file read into
a fresh tensor (no mmap, whose pages would stay resident). Writing streams each tensor's bytes straight into
its ~2 GB shard file and fills in the header when the shard is complete, so no shard is ever held in memory.
Pickled `pytorch_model.bin` checkpoints are refused, never unpickled: safetensors is required. Core lmforge
code does not import transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lmforge.atomic import atomic_dir
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.hf_config import ARCHITECTURES, BASE_PREFIX, LLAMA_LIKE, config_from_hf, config_to_hf, load_hf_config

SHARD_BYTES = 2 * 1024**3  # HF's usual shard size: large files, few of them
HEADER_BYTES = 64 * 1024  # header space a shard reserves when the writer is not told the tensors to come
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
    """lmforge name -> shape of every tensor a checkpoint of `cfg` stores (a tied lm_head is the embedding).

    Derived from the config alone, in Transformer's state_dict order (tests/test_hf_streaming.py holds the two
    equal): building even a meta-device model costs a second and ~70 MB (nn.Embedding imports torch._dynamo)."""
    C, D, F = cfg.hidden_size, cfg.dim_head, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (C,)
        if cfg.norm == "layernorm":
            shapes[f"{name}.bias"] = (C,)

    shapes["embed.tok.weight"] = (cfg.vocab_size, C)
    if cfg.position == "learned":
        shapes["embed.pos.weight"] = (cfg.max_seq_len, C)
    if cfg.type_vocab_size:
        shapes["embed.token_type.weight"] = (cfg.type_vocab_size, C)
    if cfg.embed_norm:
        norm("embed.norm")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        norm(f"{p}attn_norm")
        linear(f"{p}attn.q_proj", cfg.num_heads * D, C, cfg.qkv_bias)
        linear(f"{p}attn.k_proj", cfg.n_kv_heads * D, C, cfg.qkv_bias)
        linear(f"{p}attn.v_proj", cfg.n_kv_heads * D, C, cfg.qkv_bias)
        linear(f"{p}attn.o_proj", C, cfg.num_heads * D, cfg.out_bias)
        norm(f"{p}mlp_norm")
        if cfg.mlp == "swiglu":
            linear(f"{p}mlp.gate_proj", F, C, cfg.mlp_bias)
        linear(f"{p}mlp.up_proj", F, C, cfg.mlp_bias)
        linear(f"{p}mlp.down_proj", C, F, cfg.mlp_bias)
    if cfg.final_norm:
        norm("norm")
    if cfg.pooler:
        linear("pooler.dense", C, C, True)
    if cfg.head == "lm" and not cfg.tie_embeddings:
        linear("lm_head", cfg.vocab_size, C, False)
    elif cfg.head == "classifier":
        linear("classifier", cfg.num_labels, C, cfg.classifier_bias)
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


# safetensors dtype names; the format is little-endian, like every host torch runs on (x86, ARM).
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAME = {dtype: name for name, dtype in ST_DTYPES.items()}


def _bytes_of(t: Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _read_header(f) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header dict) of an open safetensors file."""
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + n, header


def _read_tensor(f, data_start: int, entry: dict[str, Any]) -> Tensor:
    """One tensor of an open safetensors file, read into a fresh tensor (readinto: no intermediate copy)."""
    begin, end = entry["data_offsets"]
    t = torch.empty(entry["shape"], dtype=ST_DTYPES[entry["dtype"]])
    buf = _bytes_of(t)
    if len(buf) != end - begin:
        raise ValueError(f"{len(buf)} bytes for its shape and dtype but data_offsets span {end - begin}")
    f.seek(data_start + begin)
    done = 0
    while done < len(buf):  # one read() returns at most ~2 GB on Linux
        n = f.readinto(buf[done:])
        if not n:
            raise ValueError("file ends inside the tensor's data")
        done += n
    return t


def stream_tensors(plan: list[tuple[Path, str, Any]], convert) -> Iterator[tuple[str, Tensor]]:
    """Read each (file, name, item) of `plan` one tensor at a time and yield what convert(item, tensor) yields.

    Plain reads, not safe_open's mmap: mapped pages a tensor was read from count in the process's memory until
    the file is closed, which held the whole source resident by the end of a file."""
    by_file: dict[Path, list[tuple[str, Any]]] = {}
    for path, name, item in plan:
        by_file.setdefault(path, []).append((name, item))
    for item, t in _read_files(by_file):
        yield from convert(item, t)
        del t  # free the source tensor before the next one is read (the caller holds what it keeps)


def _read_files(by_file: dict[Path, list[tuple[str, Any]]]) -> Iterator[tuple[Any, Tensor]]:
    for path, items in by_file.items():
        try:
            with open(path, "rb", buffering=0) as f:
                data_start, header = _read_header(f)
                for name, item in items:
                    yield item, _read_tensor(f, data_start, header[name])
        except (OSError, ValueError, KeyError, TypeError) as e:  # not the consumer's errors: those stay outside
            raise UserError(f"cannot read {path}: {e!r}") from None


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
        del t  # a suspended generator's locals stay alive: let this one go before the next is made
    missing = [n for n in shapes if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: missing tensor {missing[0]}{more}")


# ---- writing -----------------------------------------------------------------------------------------------------
@dataclass
class WriteSummary:
    tensors: int = 0  # tensors written (a fused GPT-2 c_attn counts once)
    params: int = 0
    bytes: int = 0
    files: int = 0
    dtype: str = ""


def _entry_json(name: str, dtype: str, shape: Iterable[int], begin: int, end: int) -> bytes:
    """One tensor's part of a safetensors header: `,"name":{...}` (compact JSON, as the header is written)."""
    entry = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return b"," + json.dumps({name: entry}, separators=(",", ":"))[1:-1].encode()


_METADATA = b'{"__metadata__":{"format":"pt"}'  # transformers checks format == "pt"; the header's closing } follows


def header_bound(shapes: Mapping[str, Iterable[int]]) -> int:
    """Bytes a safetensors header holding all these tensors can take (widest dtype name, 20-digit offsets): the
    header space a writer that will get (some of) them reserves per shard."""
    big = 10**19
    return len(_METADATA) + 1 + sum(len(_entry_json(n, "F8_E4M3", s, big, big)) for n, s in shapes.items())


def _write_all(f, data: memoryview) -> None:
    """Write every byte: a raw write may write fewer (at most ~2 GB at once on Linux)."""
    done = 0
    while done < len(data):
        done += f.write(data[done:])


class ShardWriter:
    """Write tensors into safetensors shards of about `max_bytes` as they arrive, each tensor's bytes straight
    to the shard file: memory never holds a shard, and nothing is copied on the way.

    A shard file starts with `header_bytes` (rounded up to 8) of reserved header space; its data follows, and
    the header (padded with spaces, which JSON ignores) is written into that space when the shard is
    complete. A shard ends when the next tensor would take it past max_bytes or its header past the reserved
    space (a tensor that fits neither alone gets a shard of its own). Use as a context manager, so that a
    failure closes the open file; `close()` finishes the last shard, names the files (model.safetensors, or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json) and returns what was written.

    (Writing in a background thread while the caller makes the next tensor was measured: no faster on 2 busy
    cores, where the growth's own torch threads already fill both.)"""

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES, header_bytes: int = HEADER_BYTES):
        self.folder, self.max_bytes, self.header_bytes = Path(folder), max_bytes, header_bytes
        self.shards: list[list[str]] = []  # tensor names of each shard
        self.summary = WriteSummary()
        self._file = None  # the open shard
        self._reserved = 0  # its header space
        self._header = [_METADATA]  # its header so far
        self._header_len = 0
        self._offset = 0  # its data bytes so far
        self._names: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:  # a failure before close(): the folder is about to be removed
            self._file.close()
            self._file = None

    def add(self, name: str, t: Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _ST_NAME:
            raise ValueError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        dtype, size = _ST_NAME[t.dtype], t.numel() * t.element_size()
        entry = _entry_json(name, dtype, t.shape, self._offset, self._offset + size)
        if self._file is not None and (
            self._offset + size > self.max_bytes or self._header_len + len(entry) > self._reserved
        ):
            self._finish_shard()
        if self._file is None:
            entry = _entry_json(name, dtype, t.shape, 0, size)
            self._start_shard(len(entry))
        _write_all(self._file, _bytes_of(t))
        self._header.append(entry)
        self._header_len += len(entry)
        self._offset += size
        self.shards[-1].append(name)
        self._names.add(name)
        s = self.summary
        s.tensors, s.params, s.bytes = s.tensors + 1, s.params + t.numel(), s.bytes + size
        s.dtype = s.dtype or str(t.dtype).removeprefix("torch.")

    def _start_shard(self, first_entry: int) -> None:
        self._header, self._header_len, self._offset = [_METADATA], len(_METADATA) + 1, 0
        self._reserved = -(-max(self.header_bytes, self._header_len + first_entry) // 8) * 8  # 8-byte aligned data
        self._file = open(self.folder / f".shard-{len(self.shards)}.safetensors", "wb", buffering=0)  # noqa: SIM115
        self._file.seek(8 + self._reserved)  # the data's place; the header is written over the gap at the end
        self.shards.append([])

    def _finish_shard(self) -> None:
        header = b"".join(self._header) + b"}"
        assert len(header) <= self._reserved, (len(header), self._reserved)  # add() keeps it so
        self._file.seek(0)
        _write_all(self._file, memoryview(self._reserved.to_bytes(8, "little") + header.ljust(self._reserved)))
        self._file.close()
        self._file = None

    def close(self) -> WriteSummary:
        if self._file is None and not self.shards:  # no tensors: one valid, empty file
            self._start_shard(0)
        if self._file is not None:
            self._finish_shard()
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
    rules = _rules(cfg, shapes)
    rule_of = {name: r for r in rules for name in r.lm}
    header = header_bound({_hf_name(r, arch, cfg.family): _hf_shape(r, shapes) for r in rules})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with ShardWriter(tmp, max_shard_bytes, header) as writer:
            pending: dict[_Rule, dict[str, Tensor]] = {}  # GPT-2's fused c_attn waits for its q, k and v
            for name, t in check_tensors(cfg, tensors, "export"):
                rule = rule_of[name]
                parts = pending.setdefault(rule, {})
                parts[name] = t
                if len(parts) == len(rule.lm):
                    del pending[rule]
                    writer.add(_hf_name(rule, arch, cfg.family), _from_lm(rule, [parts[n] for n in rule.lm]))
                del t, parts  # hold no tensor while the next one is made
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
    "HEADER_BYTES",
    "SHARD_BYTES",
    "ST_DTYPES",
    "SIDE_FILES",
    "ShardWriter",
    "WriteSummary",
    "check_tensors",
    "config_from_hf",
    "config_to_hf",
    "expected_shapes",
    "header_bound",
    "iter_hf_tensors",
    "load_hf_config",
    "read_headers",
    "read_side_files",
    "safetensors_files",
    "save_hf",
    "stream_tensors",
    "write_side_files",
]

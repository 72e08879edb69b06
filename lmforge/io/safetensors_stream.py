"""Streaming safetensors: read headers and tensors one at a time, write shards as tensors arrive, and the
tokenizer files that travel beside the weights."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lmforge.errors import UserError

SHARD_BYTES = 2 * 1024**3  # HF's usual shard size: large files, few of them
HEADER_BYTES = 64 * 1024  # header space a shard reserves when the writer is not told the tensors to come
INDEX_NAME = "model.safetensors.index.json"
# Files beside the weights that travel with a checkpoint verbatim (tokenizer, chat template, sampling defaults).
SIDE_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model"),
    *("vocab.txt", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json"),
    "generation_config.json",
)


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


class SafetensorsWriter:
    """Write tensors into safetensors shards of about `max_bytes` as they arrive, each tensor's bytes straight
    to the shard file: memory never holds a shard, and nothing is copied on the way.

    A shard file starts with `header_bytes` (rounded up to 8) of reserved header space; its data follows, and
    the header (padded with spaces, which JSON ignores) is written into that space when the shard is
    complete. A shard ends when the next tensor would take it past max_bytes or its header past the reserved
    space (a tensor that fits neither alone gets a shard of its own). Use as a context manager, so that a
    failure closes the open file; `close()` finishes the last shard, names the files (model.safetensors, or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json) and returns what was written."""

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

    def __enter__(self) -> SafetensorsWriter:
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

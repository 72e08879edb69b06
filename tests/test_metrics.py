import io
import json

import pytest
import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.metrics.flops import (
    PEAK_ENV,
    flops_per_token,
    lookup_peak,
    measure_cpu_gemm_flops,
    mfu,
    peak_flops,
)
from lmforge.metrics.log import MetricsLogger, Throughput
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import param_count
from lmforge.model.transformer import Transformer
from tests.families import BERT_ARCH, GPT2_ARCH

LLAMA_GQA = ModelConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128)
LLAMA_TIED = LLAMA_GQA.replace(tie_embeddings=True, num_kv_heads=None, head_dim=8)
QWEN_CLS = LLAMA_GQA.replace(family="qwen2", qkv_bias=True, head="classifier", num_labels=3, pad_token_id=0)
GPT2 = ModelConfig(**GPT2_ARCH, vocab_size=100, hidden_size=48, num_layers=2, num_heads=4, ffn_size=192, max_seq_len=64)
BERT = ModelConfig(
    **{**BERT_ARCH, "head": "classifier"},
    vocab_size=100,
    hidden_size=48,
    num_layers=2,
    num_heads=4,
    ffn_size=80,
    num_labels=2,
    pooler=True,
    classifier_bias=True,
    max_seq_len=64,
)
BERT_MLM = BERT.replace(head="lm", num_labels=0, pooler=False, classifier_bias=False, tie_embeddings=True)
CONFIGS = {
    "llama_gqa": LLAMA_GQA,
    "llama_tied": LLAMA_TIED,
    "qwen_cls": QWEN_CLS,
    "gpt2": GPT2,
    "bert": BERT,
    "bert_mlm": BERT_MLM,
}


@pytest.mark.parametrize("name", CONFIGS)
def test_param_count_matches_the_model(name):
    cfg = CONFIGS[name]
    assert param_count(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())  # a tied tensor once


@pytest.mark.parametrize("name", CONFIGS)
def test_flops_count_every_linear_weight_of_the_model(name):
    cfg, T = CONFIGS[name], 32
    model = Transformer(cfg)
    per_token = per_sequence = 0
    for mod_name, mod in model.named_modules():  # the LM head is a Linear even when its weight is tied
        if isinstance(mod, nn.Linear):
            if mod_name.startswith(("classifier", "pooler")):
                per_sequence += mod.weight.numel()
            else:
                per_token += mod.weight.numel()
    f = flops_per_token(cfg, T)
    assert f["matmul_params"] == pytest.approx(per_token + per_sequence / T)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_head * T
    assert f["attention"] == attention
    assert f["total"] == pytest.approx(6 * (per_token + per_sequence / T) + attention)
    assert f["forward"] == pytest.approx(f["total"] / 3)


def test_flops_hand_count_llama_gqa():
    # C=64, L=2, H=4 heads of 16, 2 kv heads, F=128, V=100, T=32:
    #   attention weights per layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288
    #   SwiGLU per layer: 3*64*128 = 24576; LM head 64*100 = 6400
    #   N = 2*(12288 + 24576) + 6400 = 80128; 6N = 480768; attention 12*2*4*16*32 = 49152
    f = flops_per_token(LLAMA_GQA, 32)
    assert f["matmul_params"] == 80128
    assert f["dense"] == 480768
    assert f["attention"] == 49152
    assert f["total"] == 480768 + 49152


def test_flops_tied_equals_untied_and_window_caps_attention():
    tied = LLAMA_GQA.replace(tie_embeddings=True)
    assert flops_per_token(tied, 64)["total"] == flops_per_token(LLAMA_GQA, 64)["total"]
    mha = LLAMA_GQA.replace(num_kv_heads=None)
    assert flops_per_token(mha, 64)["attn_params"] > flops_per_token(LLAMA_GQA, 64)["attn_params"]
    windowed = LLAMA_GQA.replace(sliding_window=16)
    assert flops_per_token(windowed, 64)["attention"] == flops_per_token(LLAMA_GQA, 16)["attention"]


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
        ("NVIDIA H100 NVL", torch.float16, 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA GH200 480GB", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100-PCIE-40GB", "tf32", 156.0),
        ("NVIDIA A10G", torch.bfloat16, 70.0),
        ("NVIDIA A10", torch.bfloat16, 125.0),
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("NVIDIA L40S", torch.bfloat16, 362.05),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71.0),
        ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
        ("Tesla V100-PCIE-32GB", torch.float16, 112.0),
        ("AMD Instinct MI300X", torch.bfloat16, 1307.4),
    ],
)
def test_peak_table_lookup(name, dtype, tflops):
    assert lookup_peak(name, dtype) == pytest.approx(tflops * 1e12)


def test_peak_table_fp32_follows_tf32_setting_and_unknowns_are_none():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert lookup_peak("NVIDIA A100-SXM4-80GB", torch.float32) == pytest.approx(19.5e12)
        torch.set_float32_matmul_precision("high")
        assert lookup_peak("NVIDIA A100-SXM4-80GB", torch.float32) == pytest.approx(156e12)
    finally:
        torch.set_float32_matmul_precision(before)
    assert lookup_peak("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no BF16 tensor cores
    assert lookup_peak("Some Future GPU", torch.bfloat16) is None
    with pytest.raises(UserError, match="unknown matmul dtype"):
        lookup_peak("NVIDIA H100", "int8")


def test_peak_flops_override_env_and_cpu(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops("cpu", torch.float32) is None
    assert peak_flops("cpu", torch.float32, override=1e11) == 1e11
    monkeypatch.setenv(PEAK_ENV, "97e9")
    assert peak_flops("cpu", torch.bfloat16) == 97e9
    assert peak_flops("cpu", torch.bfloat16, override=5e9) == 5e9  # the argument wins over the env
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(UserError, match=PEAK_ENV):
        peak_flops("cpu", torch.float32)
    with pytest.raises(UserError, match="positive"):
        peak_flops("cpu", torch.float32, override=-1.0)


def test_mfu(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert mfu(1e6, 1000.0, "cpu", torch.float32) is None  # no CPU peak: null
    assert mfu(1e6, None, "cpu", torch.float32, peak=1e10) is None  # no rate yet
    # 1000 tok/s * 1e6 FLOPs/token over 2 devices of 1e9 FLOP/s each
    assert mfu(1e6, 1000.0, "cpu", torch.float32, world_size=2, peak=1e9) == pytest.approx(0.5)


def test_measure_cpu_gemm_flops_is_a_plausible_rate():
    rate = measure_cpu_gemm_flops(n=256, seconds=0.2)
    assert 1e8 < rate < 1e14


def test_throughput_skips_warmup_and_slides():
    tp = Throughput(window=3, warmup=2)
    tp.update(1000, 10.0)  # compile
    tp.update(1000, 5.0)
    assert tp.tokens_per_s is None
    for _ in range(3):
        tp.update(1000, 1.0)
    assert tp.tokens_per_s == pytest.approx(1000.0)
    tp.update(1000, 0.5)  # the window drops the oldest step: 3000 tokens in 2.5 s
    assert tp.tokens_per_s == pytest.approx(1200.0)


def test_metrics_logger_writes_jsonl_and_console(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path, 0, total_steps=20, log_every=10, progress=False, stream=out) as log:
        log.log_eval(0, 0, 0.0, 4.5)
        for step in range(1, 21):
            log.log_step(
                step,
                tokens=step * 100,
                flops=step * 100 * 1e6,
                loss=torch.tensor(3.8125),
                lr=5.9e-4,
                grad_norm=0.84,
                tokens_per_s=1204.4 if step > 2 else None,
                mfu=0.412 if step > 2 else None,
                val_loss=3.9 if step == 20 else None,
                aux=1.5,
            )
        log.log_step(21, tokens=2100, flops=None, loss=float("nan"), lr=1e-4)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(22))
    assert recs[0] == {"step": 0, "tokens": 0, "flops": 0.0, "val_loss": 4.5}
    r = recs[12]
    assert r["tokens"] == 1200 and r["flops"] == 1.2e9 and r["loss"] == 3.8125 and r["aux"] == 1.5
    assert r["mem"] > 0 and "val_loss" not in r
    assert recs[20]["val_loss"] == 3.9
    assert recs[21]["loss"] is None  # NaN is not JSON
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 0/20 | val_loss 4.500"
    assert lines[1].startswith("step 1/20 | loss 3.812 | lr 5.9e-4 | gnorm 0.84 | mem ")  # first step
    assert lines[2].startswith("step 10/20 | loss 3.812 | lr 5.9e-4 | gnorm 0.84 | 1,204 tok/s | mfu 41.2% | mem ")
    assert lines[2].endswith(" GB")
    assert lines[3].startswith("step 20/20 | loss 3.812 | val_loss 3.900 |")
    assert len(lines) == 5  # 0, 1, 10, 20 and 21 (past total_steps)


def test_metrics_logger_only_rank0_writes(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, 1, progress=False, stream=out)
    assert log.log_step(1, tokens=1, flops=1.0, loss=1.0, lr=1.0) is None
    log.write("hello")
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and out.getvalue() == ""


def test_metrics_logger_resume_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 8)]
    lines.insert(5, json.dumps({"step": 5, "val_loss": 3.0}))  # logged again by the resumed run: dropped here
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # crashed mid-line
    with MetricsLogger(tmp_path, 0, start_step=5, progress=False, stream=io.StringIO()) as log:
        log.log_step(6, tokens=6, flops=None, loss=2.0, lr=None)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["loss"] == 2.0 and all("val_loss" not in r for r in recs)

"""Training FLOPs, device peaks, MFU, tokens/s and the run's metrics log (JSON lines + console + bar).

FLOPs follow nanoGPT / PaLM (appendix B): per token, 6 * N for the matmul parameters plus
12 * L * H * Dh * T for attention, with no discount for the causal mask. MFU divides the FLOPs a
step *needs* by the device's dense datasheet peak, so it is comparable with the published numbers
(it is not the hardware FLOPs a FlashAttention kernel actually executes).
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from dataclasses import dataclass

import torch

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig

PEAK_ENV = "LMFORGE_PEAK_FLOPS"  # FLOP/s per device, e.g. 989e12; overrides the table


# ---- FLOPs and parameters from the config ---------------------------------------------------------
def _layer_matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """Weight elements of one block's matmuls: (attention q/k/v/o, MLP). Biases and norms are not
    matmuls (O(C) work per token) and are left out, as in PaLM's and torchtitan's counts."""
    C, H, Hkv, D, F = cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads, cfg.dim_head, cfg.ffn_size
    attn = C * H * D + 2 * C * Hkv * D + H * D * C  # q, k and v (GQA: Hkv heads), o
    mlp = (3 if cfg.mlp == "swiglu" else 2) * C * F  # SwiGLU: gate, up, down; GELU: up, down
    return attn, mlp


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward) of `cfg` on sequences of `seq_len` tokens.

    Keys: attn_params, mlp_params, head_params (matmul weights touched per token), heldout_params, seq_head_params
    (pooler + classifier, run once per sequence), matmul_params (their per-token sum), dense
    (6 * matmul_params), attention (12 * L * H * Dh * T), total (dense + attention) and forward
    (total / 3, for evaluation-only passes)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    attn, mlp = _layer_matmul_params(cfg)
    L, C = cfg.num_layers, cfg.hidden_size
    # LM head: a (C x V) matmul per token, counted even when tied to the embedding. The embedding
    # lookup itself is a gather, not a matmul, so an untied input embedding adds no FLOPs.
    head = C * cfg.vocab_size if cfg.head == "lm" else 0
    # Classifier heads read one token per sequence: pooler (C x C) and classifier (C x labels),
    # spread over the sequence's tokens.
    seq_head = 0
    if cfg.head == "classifier":
        seq_head = (C * C if cfg.pooler else 0) + C * cfg.num_labels
    # PSP++ held-out heads (model/heldout.py): their stream's projections, the wider o_proj of the lower main
    # layers, and their own LM head (another C x V per token in training), all counted like the main matmuls.
    heldout = 0
    if cfg.heldout_layers:
        W, nd = cfg.heldout_stream, cfg.heldout_heads * cfg.heldout_dim_head
        heldout = 2 * C * W + cfg.heldout_layers * (4 * W * nd + nd * C) + C * cfg.vocab_size
    matmul = L * (attn + mlp) + head + seq_head / seq_len + heldout
    # Each matmul weight costs 2 FLOPs (multiply + add) per token forward and 4 backward (grads of
    # the input and of the weight): 6 per weight per token.
    dense = 6.0 * matmul
    # Attention scores QK^T and the weighted sum AV: each is 2 * H * Dh FLOPs per (query, key) pair,
    # so 4 * H * Dh * T forward per token and layer, times 3 for forward + backward = 12 * L * H * Dh * T.
    # Convention: nanoGPT/PaLM, no halving for the causal mask; a sliding window caps the keys seen.
    span = min(seq_len, cfg.sliding_window) if cfg.causal and cfg.sliding_window else seq_len
    attention = (
        12.0 * (L * cfg.num_heads * cfg.dim_head + cfg.heldout_layers * cfg.heldout_heads * cfg.heldout_dim_head) * span
    )
    total = dense + attention
    return {
        "attn_params": L * attn,
        "mlp_params": L * mlp,
        "head_params": head,
        "heldout_params": heldout,
        "seq_head_params": seq_head,
        "matmul_params": matmul,
        "dense": dense,
        "attention": attention,
        "total": total,
        "forward": total / 3.0,
    }


# ---- device peaks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePeak:
    """Dense (no 2:4 sparsity) datasheet peaks in TFLOP/s. bf16/fp16 with FP32 accumulation (what
    PyTorch uses); tf32 = float32 matmuls on tensor cores; fp32 = plain float32. None: no such unit."""

    name: str
    pattern: str  # regex searched (case-insensitive) in torch.cuda.get_device_name()
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float


# Order matters: the first match wins, so specific names come before their prefixes (H100 NVL
# before H100, A100 before A10, L40S before L40 before L4, GH200 before H200).
PEAK_TABLE: tuple[DevicePeak, ...] = (
    # NVIDIA B200 (HGX B200 datasheet, 8 GPUs: BF16 36 PF sparse, TF32 18 PF sparse, FP32 600 TF).
    DevicePeak("B200", r"B200", 2250.0, 2250.0, 1125.0, 75.0),
    # GH200 / H200 SXM: NVIDIA datasheets list BF16 1979 and TF32 989 with sparsity, FP32 67.
    DevicePeak("GH200", r"GH200", 989.4, 989.4, 494.7, 66.9),
    # H200 NVL datasheet: BF16 1671, TF32 835 (sparse), FP32 60.
    DevicePeak("H200 NVL", r"H200.*NVL", 835.5, 835.5, 417.5, 60.0),
    DevicePeak("H200", r"H200", 989.4, 989.4, 494.7, 66.9),
    # H100: NVIDIA H100 Tensor Core GPU architecture whitepaper, table of dense peaks.
    DevicePeak("H100 NVL", r"H100.*NVL", 835.5, 835.5, 417.5, 60.0),
    DevicePeak("H100 PCIe", r"H[18]00.*PCIe", 756.5, 756.5, 378.0, 51.2),
    DevicePeak("H100 SXM", r"H100|H800", 989.4, 989.4, 494.7, 66.9),
    # A100 datasheet (40 and 80 GB, SXM and PCIe alike): BF16 312, TF32 156, FP32 19.5.
    DevicePeak("A100", r"A100|A800", 312.0, 312.0, 156.0, 19.5),
    # A10G (AWS G5): AWS / NVIDIA A10G spec: BF16 70, TF32 35, FP32 31.52 (not the A10's numbers).
    DevicePeak("A10G", r"A10G", 70.0, 70.0, 35.0, 31.52),
    # A10 datasheet: BF16 125 | 250*, TF32 62.5 | 125*, FP32 31.2.
    DevicePeak("A10", r"\bA10\b", 125.0, 125.0, 62.5, 31.2),
    # A40 datasheet: BF16 149.7 | 299.4*, TF32 74.8 | 149.6*, FP32 37.4.
    DevicePeak("A40", r"\bA40\b", 149.7, 149.7, 74.8, 37.4),
    # L40S datasheet: BF16 362.05 | 733*, TF32 183 | 366*, FP32 91.6.
    DevicePeak("L40S", r"L40S", 362.05, 362.05, 183.0, 91.6),
    # L40 datasheet: BF16 181.05 | 362.1*, TF32 90.5 | 181*, FP32 90.5.
    DevicePeak("L40", r"\bL40\b", 181.05, 181.05, 90.5, 90.5),
    # L4 datasheet lists sparse only: BF16 242*, TF32 120*; FP32 30.3.
    DevicePeak("L4", r"\bL4\b", 121.0, 121.0, 60.0, 30.3),
    # Ada (AD102) whitepaper, appendix: RTX 4090 FP16/BF16 with FP32 accumulate 165.2 | 330.4*,
    # TF32 82.6 | 165.2*, FP32 82.6 (GeForce halves the FP32-accumulate tensor rate).
    DevicePeak("RTX 4090", r"RTX 4090", 165.2, 165.2, 82.6, 82.6),
    # Ampere GA102 whitepaper, appendix: RTX 3090 FP16/BF16 with FP32 accumulate 71 | 142*, TF32 35.6.
    DevicePeak("RTX 3090", r"RTX 3090(?! Ti)", 71.0, 71.0, 35.6, 35.6),
    # V100 datasheet: tensor (FP16) 130 / 125 / 112 for V100S / SXM2 / PCIe; no BF16 or TF32 units.
    DevicePeak("V100S", r"V100S", None, 130.0, None, 16.4),
    DevicePeak("V100 PCIe", r"V100.*PCIE", None, 112.0, None, 14.0),
    DevicePeak("V100", r"V100", None, 125.0, None, 15.7),
    # T4 datasheet: FP16 tensor 65, FP32 8.1; no BF16 / TF32 units.
    DevicePeak("T4", r"\bT4\b", None, 65.0, None, 8.1),
    # AMD Instinct MI300X / MI325X datasheets: FP16 / BF16 1307.4 dense, TF32 653.7, FP32 matrix 163.4.
    DevicePeak("MI300X", r"MI300X|MI325X", 1307.4, 1307.4, 653.7, 163.4),
    # MI250X / MI250 datasheets: FP16 / BF16 383 / 362.1, FP32 matrix 95.7 / 90.5; no TF32.
    DevicePeak("MI250X", r"MI250X", 383.0, 383.0, None, 95.7),
    DevicePeak("MI250", r"MI250\b", 362.1, 362.1, None, 90.5),
)


def precision_key(dtype: torch.dtype | str) -> str:
    """The peak column a matmul dtype runs at: bf16 | fp16 | tf32 | fp32. float32 counts as tf32
    when PyTorch lets matmuls use TF32 (`torch.set_float32_matmul_precision("high")`)."""
    name = str(dtype).removeprefix("torch.").lower()
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    key = aliases.get(name, name)
    if key not in ("bf16", "fp16", "tf32", "fp32"):
        raise UserError(f"unknown matmul dtype {dtype!r} for the FLOPs peak (bf16, fp16, tf32 or fp32)")
    if key == "fp32" and (torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        key = "tf32"
    return key


def lookup_peak(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of a device named like torch.cuda.get_device_name(), or None if unknown."""
    key = precision_key(dtype)
    for entry in PEAK_TABLE:
        if re.search(entry.pattern, device_name, flags=re.IGNORECASE):
            tflops = getattr(entry, key)
            if tflops is None and key == "tf32":  # no TF32 units: float32 runs at the FP32 rate
                tflops = entry.fp32
            return None if tflops is None else tflops * 1e12
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype | str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one `device` for matmuls in `dtype`: `override`, else $LMFORGE_PEAK_FLOPS, else
    the table for a GPU. None (MFU not reported) for a CPU or a GPU the table does not know."""
    if override is None and os.environ.get(PEAK_ENV):
        raw = os.environ[PEAK_ENV]
        try:
            override = float(raw)
        except ValueError:
            raise UserError(f"{PEAK_ENV}={raw!r} is not a number of FLOP/s (e.g. 989e12)") from None
    if override is not None:
        if not (math.isfinite(override) and override > 0):
            raise UserError(f"peak FLOP/s override must be a positive number, got {override}")
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak(name, dtype)
    if peak is None:
        warnings.warn(f"no peak FLOP/s known for {name!r}; set {PEAK_ENV} to report MFU", stacklevel=2)
    return peak


def measure_cpu_gemm_flops(n: int = 1024, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """This machine's sustained (n x n) @ (n x n) GEMM rate in FLOP/s, with torch's current threads."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm up: thread pool, caches, page faults on `out`
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * iters / elapsed


_peak_cache: dict[tuple, float | None] = {}


def mfu(
    flops_per_token: float,
    tokens_per_s: float | None,
    device: torch.device | str,
    dtype: torch.dtype | str,
    world_size: int = 1,
    peak: float | None = None,
) -> float | None:
    """Model FLOPs utilisation (0..1): achieved FLOP/s over the peak of `world_size` devices like
    `device`; tokens_per_s counts all ranks. `peak` overrides the per-device peak. None when the
    peak is unknown (a CPU without $LMFORGE_PEAK_FLOPS) or no rate is measured yet."""
    if tokens_per_s is None:
        return None
    key = (str(device), str(dtype), precision_key(dtype), peak, os.environ.get(PEAK_ENV))
    if key not in _peak_cache:  # get_device_name and the table once, not every step
        _peak_cache[key] = peak_flops(device, dtype, override=peak)
    per_device = _peak_cache[key]
    return None if per_device is None else tokens_per_s * flops_per_token / (per_device * world_size)

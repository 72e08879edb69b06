"""Hugging Face config.json <-> lmforge ModelConfig, for llama, mistral, qwen2 (and SmolLM), gpt2 and bert.

Import keeps every HF key lmforge does not use in ModelConfig.hf_extra and export writes them back, so a
round trip changes only what lmforge changed. The head comes from `architectures[0]`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.io.safetensors_stream import read_headers, safetensors_files
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import FAMILY_SWITCHES, FIXED_HEAD_DIM

# Head models keep the base model under this attribute, so their tensor names carry it as a prefix.
BASE_PREFIX = {"llama": "model.", "mistral": "model.", "qwen2": "model.", "gpt2": "transformer.", "bert": "bert."}
_CLASS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2", "bert": "Bert"}
# HF class written in `architectures` for each (family, head); reading accepts exactly these. BERT's MLM head is
# not an lmforge head, so it has no "lm".
ARCHITECTURES = {
    (family, head): {"lm": f"{c}ForCausalLM", "classifier": f"{c}ForSequenceClassification", "none": f"{c}Model"}[head]
    for family, c in _CLASS.items()
    for head in ("lm", "classifier", "none")
    if (family, head) != ("bert", "lm")
}
ARCHITECTURES["gpt2", "lm"] = "GPT2LMHeadModel"
_ARCH_INFO = {arch: key for key, arch in ARCHITECTURES.items()}
LLAMA_LIKE = ("llama", "mistral", "qwen2")

# ---- config.json -------------------------------------------------------------------------------------------------
REQUIRED = object()
# (lmforge field, HF key, HF's default or REQUIRED, type): read by config_from_hf, written by config_to_hf.
_LLAMA_FIELDS = [
    ("vocab_size", "vocab_size", REQUIRED, int),
    ("hidden_size", "hidden_size", REQUIRED, int),
    ("num_layers", "num_hidden_layers", REQUIRED, int),
    ("num_heads", "num_attention_heads", REQUIRED, int),
    ("ffn_size", "intermediate_size", REQUIRED, int),
    ("norm_eps", "rms_norm_eps", 1e-6, float),
    ("tie_embeddings", "tie_word_embeddings", False, bool),
]
_FIELDS = {
    **{
        f: [*_LLAMA_FIELDS, ("max_seq_len", "max_position_embeddings", n, int)]
        for f, n in (("llama", 2048), ("mistral", 4096 * 32), ("qwen2", 32768))
    },
    "gpt2": [
        ("vocab_size", "vocab_size", 50257, int),
        ("hidden_size", "n_embd", 768, int),
        ("num_layers", "n_layer", 12, int),
        ("num_heads", "n_head", 12, int),
        ("max_seq_len", "n_positions", 1024, int),
        ("norm_eps", "layer_norm_epsilon", 1e-5, float),
        ("tie_embeddings", "tie_word_embeddings", True, bool),
    ],
    "bert": [
        ("vocab_size", "vocab_size", 30522, int),
        ("hidden_size", "hidden_size", 768, int),
        ("num_layers", "num_hidden_layers", 12, int),
        ("num_heads", "num_attention_heads", 12, int),
        ("ffn_size", "intermediate_size", 3072, int),
        ("max_seq_len", "max_position_embeddings", 512, int),
        ("type_vocab_size", "type_vocab_size", 2, int),
        ("norm_eps", "layer_norm_eps", 1e-12, float),
    ],
}
# HF's default bos, eos and pad token ids when config.json does not say.
_TOKEN_DEFAULTS = {
    "llama": (1, 2, None),
    "mistral": (1, 2, None),
    "qwen2": (None, None, None),
    "gpt2": (50256, 50256, None),
    "bert": (None, None, 0),
}
_ACT_KEY = {"gpt2": ("activation_function", "gelu_new"), "bert": ("hidden_act", "gelu")}
_ACT_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# Keys that config_to_hf derives itself or that describe one save only; never copied through hf_extra.
_NOT_EXTRA = {
    *("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "n_ctx"),
    *("rope_theta", "rope_scaling", "rope_parameters", "layer_types"),
}


def _typed(key: str, v: Any, kind: type) -> Any:
    """v checked to be of `kind` (None passes: HF's "not set"); JSON's true/false are not numbers here."""
    if v is None:
        return None
    if kind is bool:
        ok = isinstance(v, bool)
    else:
        ok = isinstance(v, (int, float) if kind is float else kind) and not isinstance(v, bool)
    if not ok:
        raise UserError(f"config.json: {key} must be {kind.__name__}, got {v!r}")
    return float(v) if kind is float else v


def _resolve_arch(hf: dict[str, Any], arch: str | None) -> tuple[str, str, str]:
    """-> (family, head, architecture name). The family is model_type; an unknown model_type with a known
    architecture (say "smollm" with LlamaForCausalLM) takes the architecture's family."""
    archs = hf.get("architectures") or []
    arch = arch or (archs[0] if isinstance(archs, list) and archs else None)
    model_type = hf.get("model_type")
    if arch is not None and arch not in _ARCH_INFO:
        raise UserError(f"unsupported architecture {arch!r} (lmforge reads {', '.join(sorted(_ARCH_INFO))})")
    family = model_type if model_type in BASE_PREFIX else (_ARCH_INFO[arch][0] if arch else None)
    if family is None:
        raise UserError(f"unsupported model_type {model_type!r} (lmforge reads {', '.join(BASE_PREFIX)})")
    head = _ARCH_INFO[arch][1] if arch else ("none" if family == "bert" else "lm")
    return family, head, arch or ARCHITECTURES[(family, head)]


def _rope(hf: dict[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """transformers 5 `rope_parameters` or legacy `rope_theta` + `rope_scaling` -> (theta, lmforge rope_scaling)."""
    params = {
        **(_typed("rope_scaling", hf.pop("rope_scaling", None), dict) or {}),
        **(_typed("rope_parameters", hf.pop("rope_parameters", None), dict) or {}),
    }
    theta = _typed("rope_theta", hf.pop("rope_theta", None), float)
    if any(isinstance(v, dict) for v in params.values()):
        raise UserError("config.json: per-layer-type rope_parameters are not supported")
    theta = float(params.pop("rope_theta", theta if theta is not None else 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", hf.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("config.json: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"config.json: unsupported rope type {kind!r} (lmforge runs default and llama3)")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if not isinstance(params.get(key), (int, float)):
            raise UserError(f"config.json: llama3 rope scaling needs a number {key}")
    params.setdefault("original_max_position_embeddings", max_pos)
    return theta, {"rope_type": "llama3", **params}


def _window(hf: dict[str, Any], family: str, num_layers: int) -> int | None:
    """Mistral's sliding window covers every layer; Qwen2's only the layers its layer_types (or use_sliding_window
    and max_window_layers) say. lmforge runs one window for every layer or none."""
    types = _typed("layer_types", hf.pop("layer_types", None), list)
    if family == "mistral":
        window = _typed("sliding_window", hf.pop("sliding_window", 4096), int)
    else:  # unused Qwen2 values stay in hf_extra, to be written back as they were
        used = _typed("use_sliding_window", hf.pop("use_sliding_window", False), bool)
        window = _typed("sliding_window", hf.get("sliding_window", 4096), int) if used else None
        if types is None and window is not None:
            first = _typed("max_window_layers", hf.get("max_window_layers", 28), int)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        if window is not None:
            hf.pop("sliding_window", None), hf.pop("max_window_layers", None)
    if types is None or window is None:
        return window
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"} and len(types) == num_layers:
        return window
    raise UserError(f"config.json: {family} with sliding-window attention on some layers only is not supported")


def _unsupported(hf: dict[str, Any], family: str) -> str | None:
    """Switches of an HF family that lmforge's model does not have."""
    if family == "gpt2" and (not hf.pop("scale_attn_weights", True) or hf.pop("scale_attn_by_inverse_layer_idx", 0)):
        return "GPT-2 attention scaling other than 1/sqrt(head_dim)"
    if hf.get("add_cross_attention") or (family == "bert" and hf.get("is_decoder")):
        return f"{family} with cross-attention or as a decoder"
    if family == "bert" and hf.get("position_embedding_type", "absolute") != "absolute":
        return f"BERT position_embedding_type {hf['position_embedding_type']!r}"
    return None


def config_from_hf(hf_config: dict[str, Any], arch: str | None = None) -> ModelConfig:
    """An HF config.json (as a dict) -> ModelConfig. `arch` overrides `architectures[0]`, which picks the head.
    HF keys lmforge does not use are kept in hf_extra, so that config_to_hf writes them back."""
    if not isinstance(hf_config, dict):
        raise UserError("config.json is not a JSON object")
    family, head, arch = _resolve_arch(hf_config, arch)
    hf = dict(hf_config)  # what is not popped below ends up in hf_extra
    if problem := _unsupported(hf, family):
        raise UserError(f"config.json: {problem} is not supported")
    d: dict[str, Any] = {k: v for k, v in FAMILY_SWITCHES[family].items() if v != "any"}
    for field, key, default, kind in _FIELDS[family]:
        if default is REQUIRED and hf.get(key) is None:
            raise UserError(f"config.json has no {key}")
        d[field] = _typed(key, hf.pop(key, default), kind)
    act_key, act_default = _ACT_KEY.get(family, ("hidden_act", "silu"))
    act = hf.pop(act_key, act_default)
    if act not in _ACT_FROM_HF:
        raise UserError(f"config.json: unsupported {act_key} {act!r} (lmforge runs {', '.join(_ACT_FROM_HF)})")
    d["activation"] = _ACT_FROM_HF[act]
    if family == "gpt2":
        d["ffn_size"] = _typed("n_inner", hf.pop("n_inner", None), int) or 4 * d["hidden_size"]
        hf.pop("reorder_and_upcast_attn", None)  # numerics only: the same attention, computed in float32
    if family in LLAMA_LIKE:
        default_kv = {"mistral": 8, "qwen2": 32}.get(family)
        d["num_kv_heads"] = _typed("num_key_value_heads", hf.pop("num_key_value_heads", default_kv), int)
        d["head_dim"] = _typed("head_dim", hf.pop("head_dim", None), int)
        if d["num_kv_heads"] == d["num_heads"]:
            d["num_kv_heads"] = None
        if (
            d["num_heads"] > 0 and d["head_dim"] == d["hidden_size"] // d["num_heads"]
        ):  # keep only a head_dim that is not the default
            d["head_dim"] = None
        d["rope_theta"], d["rope_scaling"] = _rope(hf, d["max_seq_len"])
        if family == "llama":
            d["qkv_bias"] = d["out_bias"] = _typed("attention_bias", hf.pop("attention_bias", False), bool)
            d["mlp_bias"] = _typed("mlp_bias", hf.pop("mlp_bias", False), bool)
            hf.pop("pretraining_tp", None)  # a training-time detail that HF itself ignores at inference
        else:
            d["sliding_window"] = _window(hf, family, d["num_layers"])
    for key, default in zip(("bos_token_id", "eos_token_id", "pad_token_id"), _TOKEN_DEFAULTS[family]):
        v = hf.get(key, default)
        if isinstance(v, list):  # several eos ids (Llama 3): lmforge stops at the first, hf_extra keeps them all
            v = v[0] if v else None
        else:
            hf.pop(key, None)
        d[key] = _typed(key, v, int)
    d["family"], d["head"] = family, head
    if head == "classifier":
        labels = hf.get("id2label")
        n = len(labels) if isinstance(labels, dict) and labels else hf.pop("num_labels", 2)
        d["num_labels"] = _typed("num_labels", n, int)
        d["pooler"] = d["classifier_bias"] = family == "bert"
    extra = {k: v for k, v in hf.items() if k not in _NOT_EXTRA or k in ("dtype", "torch_dtype")}
    try:
        return ModelConfig(**d, hf_extra=extra)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.json: {e}") from None


def load_hf_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a JSON object")
    cfg = config_from_hf(d)
    if cfg.family == "bert" and cfg.head == "none":  # a BertModel may or may not carry its pooler
        names = read_headers(safetensors_files(folder))
        cfg = cfg.replace(pooler=any(n.split("pooler.", 1)[0] in ("", "bert.") for n in names if "pooler." in n))
    return cfg


def check_exportable(cfg: ModelConfig) -> str:
    if cfg.heldout_layers:
        raise UserError(
            "cannot export held-out heads (PSP++) to Hugging Face form: no transformers architecture reads them; "
            "save it in lmforge form (lmforge convert SRC DST --to lmforge), which lmforge load/eval/generate read"
        )
    if (cfg.family, cfg.head) not in ARCHITECTURES:
        raise UserError(f"cannot export a {cfg.family} model with a {cfg.head!r} head to Hugging Face form")
    for key, want in FAMILY_SWITCHES[cfg.family].items():
        if want != "any" and getattr(cfg, key) != want:
            raise UserError(f"cannot export as {cfg.family}: {key}={getattr(cfg, key)!r} but it needs {want!r}")
    if cfg.family == "llama" and cfg.qkv_bias != cfg.out_bias:
        raise UserError("cannot export as llama: one attention_bias covers q, k, v and o (qkv_bias != out_bias)")
    if cfg.family in FIXED_HEAD_DIM and cfg.n_kv_heads != cfg.num_heads:
        raise UserError(f"cannot export as {cfg.family}: it has no grouped-query attention")
    if cfg.family == "bert" and cfg.head == "classifier" and not (cfg.pooler and cfg.classifier_bias):
        raise UserError("cannot export as bert: BertForSequenceClassification needs pooler and classifier_bias")
    return ARCHITECTURES[(cfg.family, cfg.head)]


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a config.json dict that transformers' AutoConfig / AutoModel* load (4.45 through 5.x)."""
    arch = check_exportable(cfg)
    out = {k: v for k, v in cfg.hf_extra.items() if k not in _NOT_EXTRA}
    out.update({key: getattr(cfg, field) for field, key, _, _ in _FIELDS[cfg.family]})
    extra_eos = cfg.hf_extra.get("eos_token_id")
    eos = extra_eos if isinstance(extra_eos, list) and extra_eos[:1] == [cfg.eos_token_id] else cfg.eos_token_id
    out.update(
        architectures=[arch],
        model_type=cfg.family,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos,
        pad_token_id=cfg.pad_token_id,
    )
    tanh = "gelu_new" if cfg.family in ("gpt2", "bert") else "gelu_pytorch_tanh"
    out[_ACT_KEY.get(cfg.family, ("hidden_act",))[0]] = {"silu": "silu", "gelu": "gelu"}.get(cfg.activation, tanh)
    if cfg.family == "gpt2":
        out.update(n_inner=cfg.ffn_size, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    if cfg.family in LLAMA_LIKE:
        out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.dim_head)
        rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling (5.x folds those in too).
        out.update(rope_parameters={**rope, "rope_theta": cfg.rope_theta}, rope_theta=cfg.rope_theta)
        if cfg.rope_scaling is not None:
            out["rope_scaling"] = rope
    if cfg.family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.family == "qwen2":  # max_window_layers=0 puts the window on every layer in 4.x; layer_types in 5.x
        used = cfg.sliding_window is not None
        out["use_sliding_window"] = used
        if used:
            out.update(sliding_window=cfg.sliding_window, max_window_layers=0)
        out["layer_types"] = ["sliding_attention" if used else "full_attention"] * cfg.num_layers
    if cfg.head == "classifier":
        labels = cfg.hf_extra.get("id2label")
        if not (isinstance(labels, dict) and len(labels) == cfg.num_labels):
            labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["id2label"] = {str(k): v for k, v in labels.items()}
        out["label2id"] = {v: int(k) for k, v in labels.items()}
    return out

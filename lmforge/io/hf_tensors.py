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

import torch
from torch import Tensor

from lmforge.errors import UserError
from lmforge.io.atomic import atomic_dir
from lmforge.io.hf_config import ARCHITECTURES, BASE_PREFIX, LLAMA_LIKE, config_to_hf
from lmforge.io.safetensors_stream import (
    FLOAT_DTYPES,
    SHARD_BYTES,
    SafetensorsWriter,
    WriteSummary,
    header_bound,
    read_headers,
    safetensors_files,
    stream_tensors,
    write_side_files,
)
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import check_tensors, expected_shapes


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
        with SafetensorsWriter(tmp, max_shard_bytes, header) as writer:
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

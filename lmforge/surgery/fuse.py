"""Fusion: a smaller model made from a larger trained one by combining its weights, not dropping them.

`fuse(cfg, state, calib_ids, hidden=..., ffn=..., heads=..., kv_heads=..., layers=..., method="fuse")`
-> (target config, state dict, report). Pure over (config, state dict): the model is built only to run the
calibration tokens (lmforge.surgery.fuse_calib). Two stages, as in Baidu's LEMON (parameter fusion, ACL 2024):

1. Dimension fusion, every layer, in the source's hidden basis:
   - heads: KV heads are grouped (GQA order kept: KV head j serves query heads j*g .. j*g+g-1), then the query
     heads within each fused KV group, by their contributions to the residual stream on calibration data;
     a group's q/k/v rows are averaged with energy weights, and o_proj is refitted by least squares to
     reproduce the layer's original attention output from the fused heads;
   - FFN neurons: grouped by their activations, gate/up rows averaged the same way, down_proj refitted;
   - every refit is ridge least squares toward the writer fusion would use without data (the sum of a group's
     members' writer columns), its ridge chosen on held-out calibration tokens (fuse_math.refit);
   - hidden channels: one map E (C, C') with orthonormal columns for the whole stream, x' = E^T x. Every
     residual writer W becomes E^T W, every reader W E, embeddings emb E; norm gains sqrt(C/C') (E*E)^T g,
     biases E^T b and eps * C/C' (so a norm of fused channels sees the statistics the source's norm saw).
     E groups channels by the norm outputs of every layer (a group's column is its top eigenvector) or, for
     pre-norm RMSNorm models, after the block norms' gains are folded into their readers, also the stream's
     top principal directions; whichever keeps the model closer to the source on calibration text is used.
2. Layer fusion, on the dimension-fused model: neighbouring layers whose blocks change the stream least
   (block influence) form groups; each group's layers are aligned (heads and neurons paired by activation
   correlation), their readers (norms, q/k/v, gate/up) averaged with weights proportional to influence, and
   the writers (o_proj, down_proj) refitted so the one block reproduces the whole group's update (pre-norm;
   post-norm writers are averaged too). That combination, the most influential block's readers with refitted
   writers, and that block alone are candidates; the one whose model stays closest to the unfused model's
   next-token distributions (KL) on held-out calibration sequences is kept.

Exactness: a target equal to the source is the identity, and a model that holds exact copies (heads, neurons,
residual channels duplicated, identity blocks inserted: what `lmforge grow` makes) fuses back to its source's
function (the refits' priors, a group's summed writers, are then exact); tests/test_fuse.py checks both. Anything
else is approximate by design: the fused model is the start of recovery training (`lmforge distill`).

`method="prune"` is the Minitron-style baseline in the same code: keep the most important heads / neurons /
channels (mean activation magnitude), no refit; drop the least influential layers. Two more baselines isolate what
merging itself adds: "prune-refit" keeps what pruning keeps but refits the writers (o_proj, down_proj) exactly as
fusion does, and "prune-map" also chooses the hidden map by fusion's search. `drop_layers` is the layer-dropping
baseline (ShortGPT).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.shapes import FIXED_HEAD_DIM, expected_shapes, param_count
from lmforge.model.transformer import Attention, Transformer
from lmforge.surgery.fuse_calib import Calibration, calibrate, head_outputs
from lmforge.surgery.fuse_math import Group, cluster, correlation, equal_groups, match, refit

# method: (merge heads / neurons / layers, refit writers, search the hidden map)
METHODS = {
    "fuse": (True, True, True),
    "prune": (False, False, False),
    "prune-refit": (False, True, False),
    "prune-map": (False, True, True),
}
READERS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("attn.o_proj", "mlp.down_proj")
Progress = Callable[[str, int, int], None]  # (what runs now, units done, units in all): a bar with a total and an ETA


# ---- target ----------------------------------------------------------------------------------------------------------
def target_config(
    cfg: ModelConfig,
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
) -> ModelConfig:
    """The fused model's config; sizes not given stay the source's (heads follow hidden at fixed head_dim)."""
    if cfg.heldout_layers:
        raise UserError("this surgery does not know held-out heads (PSP++): their sizes are tied to the main model's")
    C, D = cfg.hidden_size, cfg.dim_head
    hidden = hidden or C
    if heads is None:
        heads = cfg.num_heads if hidden == C else max(1, hidden // D)
    if kv_heads is None:  # keep the GQA ratio where it fits, else the most KV heads that divide both counts
        kv_heads = cfg.n_kv_heads * heads // cfg.num_heads
        if kv_heads == 0 or cfg.n_kv_heads * heads % cfg.num_heads or cfg.n_kv_heads % kv_heads:
            kv_heads = max(k for k in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % k == 0 and heads % k == 0)
    ffn, layers = ffn or cfg.ffn_size, layers or cfg.num_layers
    for name, new, old in (
        ("--hidden", hidden, C),
        ("--ffn", ffn, cfg.ffn_size),
        ("--heads", heads, cfg.num_heads),
        ("--kv-heads", kv_heads, cfg.n_kv_heads),
        ("--layers", layers, cfg.num_layers),
    ):
        if not 0 < new <= old:
            raise UserError(f"{name} {new} must be between 1 and the source's {old} (to grow, use lmforge grow)")
    if heads % kv_heads:
        raise UserError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    if cfg.n_kv_heads % kv_heads:
        raise UserError(f"--kv-heads {kv_heads} must divide the source's {cfg.n_kv_heads} KV heads")
    if cfg.family in FIXED_HEAD_DIM and hidden != heads * D:
        raise UserError(f"{cfg.family} needs hidden = heads x head_dim ({heads} x {D} = {heads * D}), got {hidden}")
    head_dim = None if cfg.head_dim is None and hidden == heads * D else D
    return cfg.replace(
        hidden_size=hidden,
        ffn_size=ffn,
        num_heads=heads,
        num_kv_heads=None if cfg.num_kv_heads is None and kv_heads == heads else kv_heads,
        head_dim=head_dim,
        num_layers=layers,
        norm_eps=cfg.norm_eps * C / hidden,
    )


# ---- entry point ---------------------------------------------------------------------------------------------------
def fuse(
    cfg: ModelConfig,
    state: Mapping[str, Tensor],
    calib_ids: Tensor,
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    method: str = "fuse",
    ridge: float | None = None,
    progress: Progress | None = None,
) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """Fuse (or prune, method="prune") the model (cfg, state) to the target sizes, using calib_ids (B, T)."""
    if method not in METHODS:
        raise UserError(f"fusion method {method!r} is not one of {', '.join(METHODS)}")
    merge, _, search_map = METHODS[method]
    tgt = target_config(cfg, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers)
    # Units of work, for progress: calibration, each layer's dimensions, the hidden map, then the layer stage
    # (fusion: a calibration and each new block; pruning: one choice). They differ in cost: an ETA is rough.
    layer_units = (1 + tgt.num_layers if merge else 1) if tgt.num_layers != cfg.num_layers else 0
    total = 1 + cfg.num_layers + (tgt.hidden_size != cfg.hidden_size) + layer_units
    done = 0

    def say(msg: str) -> None:  # announces a unit of work, counting those before it as done
        nonlocal done
        if progress is not None:
            progress(msg, done, total)
        done += 1

    dtype = next(iter(state.values())).dtype
    sd = {k: v.float() for k, v in state.items()}
    model = _build(cfg, sd)
    say(f"calibrating on {calib_ids.numel():,} tokens")
    calib = calibrate(model, calib_ids)
    report: dict = {"method": method, "source_params": param_count(cfg), "target_params": param_count(tgt)}

    # Stage 1: dimensions, every layer in the source's hidden basis, then the hidden map.
    width = cfg.replace(
        ffn_size=tgt.ffn_size, num_heads=tgt.num_heads, num_kv_heads=tgt.n_kv_heads, head_dim=cfg.dim_head
    )
    for i in range(cfg.num_layers):
        say(f"dimensions: layer {i + 1}/{cfg.num_layers}")
        if (tgt.num_heads, tgt.n_kv_heads) != (cfg.num_heads, cfg.n_kv_heads):
            _fuse_heads(cfg, width, model, sd, i, calib, method, ridge)
        if tgt.ffn_size != cfg.ffn_size:
            _fuse_ffn(cfg, tgt.ffn_size, sd, i, calib, method, ridge)
    mid = tgt.replace(num_layers=cfg.num_layers)
    if tgt.hidden_size != cfg.hidden_size:
        say(f"hidden size {cfg.hidden_size} -> {tgt.hidden_size}")
        if search_map:
            sd, report["hidden_map_kl"] = fuse_hidden(
                cfg, mid, sd, calib, Judge(model, calib_ids[-max(1, len(calib_ids) // 4) :])
            )
        else:
            sd = apply_hidden_map(sd, _map_matrix(_top(calib.stream_abs, tgt.hidden_size), cfg.hidden_size))

    # Stage 2: layers.
    if tgt.num_layers != cfg.num_layers:
        if merge:
            say("calibrating the dimension-fused model for layer fusion")
            sd, groups = fuse_layers(mid, sd, calib_ids, tgt.num_layers, ridge, say)
            report["layer_groups"] = groups
        else:  # Minitron's depth pruning: keep the most influential blocks of the source
            say(f"layers {cfg.num_layers} -> {tgt.num_layers}")
            influence = [calib.block_influence(i) for i in range(cfg.num_layers)]
            keep = sorted(sorted(range(cfg.num_layers), key=lambda i: -influence[i])[: tgt.num_layers])
            sd = select_layers(sd, keep)
            report["layer_groups"] = [[i] for i in keep]
    names = expected_shapes(tgt)
    out = {k: sd[k].to(dtype).contiguous() for k in names}
    for k, shape in names.items():
        assert tuple(out[k].shape) == shape, (k, tuple(out[k].shape), shape)
    if progress is not None:
        progress("done", done, total)
    return tgt, out, report


def _build(cfg: ModelConfig, sd: Mapping[str, Tensor]) -> Transformer:
    from lmforge.io.checkpoints import model_from_tensors

    return model_from_tensors(cfg, ((k, sd[k]) for k in expected_shapes(cfg)))


def _top(importance: Tensor, k: int) -> list[Group]:
    """The k most important channels as singleton groups, in their original order (pruning)."""
    keep = torch.sort(torch.topk(importance.double(), k).indices).values
    one = torch.ones(1, dtype=torch.float64)
    return [Group(i.view(1), one) for i in keep]


def _map_matrix(groups: list[Group], n: int) -> Tensor:
    """E (n, k): column j holds group j's coefficients on its members."""
    e = torch.zeros(n, len(groups), dtype=torch.float64)
    for j, g in enumerate(groups):
        e[g.members, j] = g.coef
    return e


def _combine(rows: Tensor, groups: list[Group]) -> Tensor:
    """rows (n, ...) -> (k, ...): each group's rows averaged with its energy weights. (index_select, not
    rows[idx]: on CPU, advanced indexing of a large 2-D tensor costs milliseconds per call.)"""
    return torch.stack(
        [torch.einsum("m,m...->...", g.weights.to(rows.dtype), rows.index_select(0, g.members)) for g in groups]
    )


# ---- stage 1: heads, neurons, hidden channels ---------------------------------------------------------------------
def _fuse_heads(
    cfg: ModelConfig, width: ModelConfig, model: Transformer, sd: dict, i: int, calib: Calibration, method, ridge
) -> None:
    """Layer i's attention from (H, KV) heads to width's (H', KV'), in place in sd."""
    H, KV, D, C = cfg.num_heads, cfg.n_kv_heads, cfg.dim_head, cfg.hidden_size
    H2, KV2 = width.num_heads, width.n_kv_heads
    g, g2 = H // KV, H2 // KV2
    p = f"layers.{i}.attn."
    y = head_outputs(model, model.layers[i].attn, calib.attn_in[i])  # (N, H, D)
    wo = sd[p + "o_proj.weight"].view(C, H, D)
    size = KV // KV2  # source KV heads per fused KV head
    merge, refit_writers, _ = METHODS[method]
    if merge:
        contrib = torch.einsum("nhd,chd->hnc", y, wo).flatten(1)  # (H, N*C): each head's write to the stream
        gram = contrib.double() @ contrib.double().T  # (H, H)
        kv_groups = [Group(torch.tensor([j]), torch.ones(1, dtype=torch.float64)) for j in range(KV)]
        if KV2 < KV:  # KV heads are merged by what they compute: their keys and values on the calibration tokens
            x = calib.attn_in[i].flatten(0, 1)  # (N, C)
            kv = torch.cat(
                [F.linear(x, sd[p + n + ".weight"]).view(-1, KV, D) for n in ("k_proj", "v_proj")], dim=2
            ).transpose(0, 1)  # (KV, N, 2D)
            kv = kv.flatten(1).double()
            try:  # greedy merging under a size cap can leave groups that cannot be completed
                kv_groups = cluster(kv @ kv.T, KV2, signed=False, max_size=size)
            except ValueError:
                kv_groups = []
            if any(len(grp.members) != size for grp in kv_groups) or not kv_groups:
                kv_groups = equal_groups(KV, KV2)
    else:  # Minitron: a head's importance is the norm of its output; a KV head's, the sum over its query heads.
        importance = y.double().pow(2).sum((0, 2)).sqrt()  # (H,)
        kv_importance = importance.view(KV, g).sum(1)
        # Neighbouring KV heads share one slot, which keeps the most important one's keys and values.
        kv_groups = []
        for grp in equal_groups(KV, KV2):
            coef = torch.zeros(size, dtype=torch.float64)
            coef[int(torch.argmax(kv_importance[grp.members]))] = 1.0
            kv_groups.append(Group(grp.members, coef))
    q_groups: list[Group] = []
    for kv in kv_groups:
        cand = torch.cat([torch.arange(j * g, (j + 1) * g) for j in kv.members.tolist()])
        if merge:
            sub = cluster(gram.index_select(0, cand).index_select(1, cand), g2, signed=False)
        else:
            sub = _top(importance[cand], g2)
        q_groups += [Group(cand[s.members], s.coef) for s in sub]

    def heads_of(name: str, n: int, groups: list[Group]) -> None:
        w = sd[p + name + ".weight"].view(n, D, C)
        sd[p + name + ".weight"] = _combine(w, groups).reshape(len(groups) * D, C)
        if cfg.qkv_bias:
            b = sd[p + name + ".bias"].view(n, D)
            sd[p + name + ".bias"] = _combine(b, groups).reshape(-1)

    heads_of("q_proj", H, q_groups)
    heads_of("k_proj", KV, kv_groups)
    heads_of("v_proj", KV, kv_groups)
    if refit_writers:  # refit o_proj: the fused heads' outputs -> the layer's original attention output
        attn = Attention(width)
        attn.load_state_dict(
            {k.removeprefix(p): v for k, v in sd.items() if k.startswith(p) and "o_proj" not in k}, strict=False
        )
        y2 = head_outputs(model, attn, calib.attn_in[i]).flatten(1)  # (N, H' * D)
        prior = torch.stack([wo.index_select(1, grp.members).sum(1) for grp in q_groups], 1)  # (C, H', D)
        w, b = refit(
            y2,
            calib.attn_out[i],
            bias=cfg.out_bias,
            ridge=ridge,
            prior=prior.flatten(1),
            prior_bias=sd.get(p + "o_proj.bias"),
        )
        sd[p + "o_proj.weight"] = w.float()
        if b is not None:
            sd[p + "o_proj.bias"] = b.float()
    else:
        keep = torch.cat([grp.members for grp in q_groups])
        sd[p + "o_proj.weight"] = wo.index_select(1, keep).reshape(C, H2 * D)


def mlp_hidden(cfg: ModelConfig, sd: Mapping[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    """(N, F) activations entering down_proj for MLP inputs x (N, C), with weights sd[prefix + ...]."""
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[cfg.activation]
    up = F.linear(x, sd[prefix + "up_proj.weight"], sd.get(prefix + "up_proj.bias"))
    if cfg.mlp == "swiglu":
        return act(F.linear(x, sd[prefix + "gate_proj.weight"], sd.get(prefix + "gate_proj.bias"))) * up
    return act(up)


def _fuse_ffn(
    cfg: ModelConfig, ffn: int, sd: dict, i: int, calib: Calibration, method: str, ridge: float | None
) -> None:
    """Layer i's MLP from F to ffn neurons, in place in sd."""
    p = f"layers.{i}.mlp."
    h = mlp_hidden(cfg, sd, p, calib.mlp_in[i])  # (N, F)
    merge, refit_writers, _ = METHODS[method]
    if merge:
        groups = cluster(h.double().T @ h.double(), ffn, signed=False)
    else:  # Minitron: a neuron's importance is its mean activation magnitude
        groups = _top(h.abs().mean(0), ffn)
    for name in ("gate_proj", "up_proj") if cfg.mlp == "swiglu" else ("up_proj",):
        sd[p + name + ".weight"] = _combine(sd[p + name + ".weight"], groups)
        if cfg.mlp_bias:
            sd[p + name + ".bias"] = _combine(sd[p + name + ".bias"], groups)
    if refit_writers:  # refit down_proj: fused activations -> the original MLP output
        down = sd[p + "down_proj.weight"]  # (C, F)
        prior = torch.stack([down.index_select(1, grp.members).sum(1) for grp in groups], 1)  # (C, ffn)
        h = mlp_hidden(cfg, sd, p, calib.mlp_in[i])
        w, b = refit(
            h, calib.mlp_out[i], bias=cfg.mlp_bias, ridge=ridge, prior=prior, prior_bias=sd.get(p + "down_proj.bias")
        )
        sd[p + "down_proj.weight"] = w.float()
        if b is not None:
            sd[p + "down_proj.bias"] = b.float()
    else:
        keep = torch.cat([grp.members for grp in groups])
        sd[p + "down_proj.weight"] = sd[p + "down_proj.weight"].index_select(1, keep)


def fuse_hidden(
    cfg: ModelConfig, mid: ModelConfig, sd: dict[str, Tensor], calib: Calibration, judge: Judge
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The hidden channels from cfg's to mid's, by whichever map keeps the model closest to the source (judge):
    - "groups": channels merged in groups (cluster), each norm's gain averaged over a group's channels;
    - "groups-folded" (RMSNorm, pre-norm): the same, with the block norms' gains first moved into their readers,
      so a group's readers keep each member's own gain;
    - "pca" (RMSNorm, pre-norm): gains folded the same way, then the top principal directions of the normalised
      stream x / rms(x) (SliceGPT's projection, one for the whole stream): the rank-C' map that keeps most of
      what the norms see, and so also their statistics; "pca-gained": of the norms' outputs, gains included.
    Returns the chosen map's state and every candidate's distance from the source, the chosen one's first."""
    C, C2 = cfg.hidden_size, mid.hidden_size
    groups = _map_matrix(cluster(calib.stream_gram, C2, signed=True), C)
    maps, candidates = {"groups": groups}, {"groups": apply_hidden_map(sd, groups)}
    if cfg.norm == "rmsnorm" and cfg.norm_position == "pre":
        folded = fold_norm_gains(cfg, sd)
        maps["groups-folded"], candidates["groups-folded"] = groups, apply_hidden_map(folded, groups)
        for name, gram in (("pca", calib.unit_gram), ("pca-gained", calib.stream_gram)):
            _, vecs = torch.linalg.eigh(gram)  # ascending
            maps[name] = vecs[:, -C2:].flip(1)
            candidates[name] = apply_hidden_map(folded, maps[name])
    if cfg.tie_embeddings and cfg.norm == "rmsnorm" and cfg.head == "lm":
        emb = sd["embed.tok.weight"].double()  # (V, C)
        metric = emb.T @ emb  # (C, C): how the tied head's logits weigh the final stream, once for every map
        for name, e in maps.items():
            candidates[name]["norm.weight"] = _tied_final_gain(metric, sd["norm.weight"], e, calib.final_unit_gram)
    names = expected_shapes(mid)
    score = {name: judge.distance(_build(mid, {k: c[k] for k in names})) for name, c in candidates.items()}
    ranked = dict(sorted(score.items(), key=lambda kv: kv[1]))
    return candidates[next(iter(ranked))], ranked


def _tied_final_gain(m: Tensor, final_gain: Tensor, e: Tensor, unit_gram: Tensor) -> Tensor:
    """The final RMSNorm's gain (C',) after the hidden map e (C, C') when the LM head is tied to the embeddings
    (so the gain cannot move into the head): the g minimising, over the calibration tokens' normalised final
    streams u, the logit error ||emb (e (g * e^T u) - g_f * u)||^2, a C'-unknown least-squares problem
    ((e^T M e) o (e^T S e)) g = diag(e^T M diag(g_f) S e), with m = M = emb^T emb (C, C), final_gain = g_f (C,)
    and unit_gram = S = sum u u^T; then scaled by sqrt(C/C') like every fused norm gain. (The map's own average
    of the gain ignores which channels the logits read.)"""
    g_f, e = final_gain.double(), e.double()
    me = m @ e
    a = (e.T @ me) * (e.T @ unit_gram @ e)  # (C', C') positive semi-definite (Schur product)
    b = ((me * g_f[:, None]).T @ unit_gram @ e).diagonal()  # (C',): diag(e^T M diag(g_f) S e)
    a.diagonal().add_(1e-9 * a.diagonal().mean())
    gain = torch.linalg.solve(a, b) * math.sqrt(e.shape[0] / e.shape[1])
    return gain.to(final_gain.dtype)


def fold_norm_gains(cfg: ModelConfig, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Pre-norm RMSNorm: each block norm's gain multiplied into the readers after it (q/k/v after attn_norm,
    gate/up after mlp_norm) and set to 1; the same function. (The final norm keeps its gain when the LM head is
    tied to the embeddings, which write the stream too.)"""
    out = dict(sd)
    readers = {"attn_norm": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp_norm": ("mlp.gate_proj", "mlp.up_proj")}
    norms = [
        (f"layers.{i}.{n}.weight", [f"layers.{i}.{r}.weight" for r in rs])
        for i in range(cfg.num_layers)
        for n, rs in readers.items()
    ]
    if "lm_head.weight" in sd:
        norms.append(("norm.weight", ["lm_head.weight"]))
    for norm, names in norms:
        for name in names:
            if name in sd:  # gate_proj only in SwiGLU
                out[name] = sd[name] * sd[norm]
        out[norm] = torch.ones_like(sd[norm])
    return out


def apply_hidden_map(sd: Mapping[str, Tensor], e: Tensor) -> dict[str, Tensor]:
    """Every tensor touching the residual stream through x' = E^T x; e (C, C') with orthonormal columns."""
    C, C2 = e.shape
    e = e.to(next(iter(sd.values())).dtype)  # float32 in fuse(); float64 in tests
    gain = math.sqrt(C / C2)
    # BERT's pooler reads the stream and writes a C-wide feature through tanh, which the classifier reads: that
    # feature's channels are averaged within each group (tanh keeps averages of equal values, not sums).
    pooled = "pooler.dense.weight" in sd
    average, total = e * e, (e != 0).float()  # (C, C'): group weights (columns sum to 1), membership
    out = {}
    for name, t in sd.items():
        if name.startswith("embed.") and name.endswith(".weight") and not name.startswith("embed.norm"):
            t = t @ e  # (rows, C) -> (rows, C'): embeddings write the stream
        elif name == "classifier.weight" and pooled:
            t = t @ total
        elif name == "pooler.dense.weight":
            t = average.T @ t @ e
        elif name == "pooler.dense.bias":
            t = average.T @ t
        elif name in ("lm_head.weight", "classifier.weight") or (name.endswith(".weight") and _part(name) in READERS):
            t = t @ e  # readers: (out, C) -> (out, C')
        elif _part(name) in WRITERS:
            t = e.T @ t  # writers: (C, in) -> (C', in); their biases (C,) -> (C',)
        elif "norm." in name or name.startswith("norm."):
            t = gain * average.T @ t if name.endswith(".weight") else e.T @ t
        out[name] = t
    return out


def _part(name: str) -> str:
    """'layers.3.attn.q_proj.weight' -> 'attn.q_proj'."""
    parts = name.split(".")
    return ".".join(parts[2:4]) if parts[0] == "layers" and len(parts) >= 5 else ""


# ---- stage 2: layers ------------------------------------------------------------------------------------------------
def layer_groups(calib: Calibration, n_layers: int, target: int) -> list[list[int]]:
    """Contiguous groups of blocks: repeatedly merge the neighbouring pair whose merged span changes the stream
    least (block influence of the span)."""
    groups = [[i] for i in range(n_layers)]
    while len(groups) > target:
        spans = [calib.block_influence(a[0], b[-1]) for a, b in zip(groups, groups[1:])]
        j = min(range(len(spans)), key=spans.__getitem__)
        groups[j : j + 2] = [groups[j] + groups[j + 1]]
    return groups


def select_layers(sd: Mapping[str, Tensor], keep: list[int]) -> dict[str, Tensor]:
    """Only the blocks in `keep` (ascending), renumbered."""
    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        pre = f"layers.{old}."
        out.update({f"layers.{new}." + k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)})
    return out


def drop_layers(
    cfg: ModelConfig, state: Mapping[str, Tensor], calib_ids: Tensor, layers: int
) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """The layer-dropping baseline (ShortGPT): keep the `layers` blocks with the largest block influence."""
    if not 0 < layers <= cfg.num_layers:
        raise UserError(f"--layers {layers} must be between 1 and the source's {cfg.num_layers}")
    sd = {k: v for k, v in state.items()}
    calib = calibrate(_build(cfg, {k: v.float() for k, v in sd.items()}), calib_ids)
    influence = [calib.block_influence(i) for i in range(cfg.num_layers)]
    keep = sorted(sorted(range(cfg.num_layers), key=lambda i: -influence[i])[:layers])
    tgt = cfg.replace(num_layers=layers)
    out = select_layers(sd, keep)
    report = {"method": "drop", "source_params": param_count(cfg), "target_params": param_count(tgt)}
    return tgt, {k: out[k] for k in expected_shapes(tgt)}, {**report, "layer_groups": [[i] for i in keep]}


@torch.no_grad()
def fuse_layers(
    cfg: ModelConfig,
    sd: dict[str, Tensor],
    calib_ids: Tensor,
    target: int,
    ridge: float | None,
    say: Callable[[str], None] = lambda _msg: None,
) -> tuple[dict[str, Tensor], list[list[int]]]:
    """cfg.num_layers blocks -> `target` blocks (see the module docstring). Returns the state and the groups. `say`
    is told of each new block before it is made."""
    model = _build(cfg, sd)
    # Candidates are fitted on some calibration sequences and judged on others, so a refit cannot win by
    # memorising its own fitting data.
    held_out = calib_ids.shape[0] // 4
    fit_ids, judge_ids = (calib_ids[:-held_out], calib_ids[-held_out:]) if held_out else (calib_ids, calib_ids)
    calib = calibrate(model, fit_ids)
    groups = layer_groups(calib, cfg.num_layers, target)
    influence = [calib.block_influence(i) for i in range(cfg.num_layers)]
    judge = Judge(model, judge_ids)

    def score(group: list[int], block: dict[str, Tensor]) -> float:  # the model with only `group` replaced
        keep = [i for i in range(cfg.num_layers) if i not in group[1:]]
        state = select_layers({**sd, **{f"layers.{group[0]}.{k}": v for k, v in block.items()}}, keep)
        return judge.distance(_build(cfg.replace(num_layers=len(keep)), state))

    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    for new, group in enumerate(groups):
        say(f"layers: block {new + 1}/{len(groups)} from {len(group)}")
        if len(group) == 1:
            block = _layer(sd, group[0])
        else:
            candidates = _merge_candidates(cfg, model, sd, group, influence, calib, ridge)
            block = min(candidates, key=lambda b, g=group: score(g, b))
        out.update({f"layers.{new}.{k}": v for k, v in block.items()})
    return out, groups


class Judge:
    """How far a candidate model is from the reference: the KL divergence, on a few calibration sequences, from
    the reference's output distributions (next-token, or class for a classifier); for a headless encoder the
    relative squared error of its hidden states. (The residual stream's L2 error is a poor proxy for an LM: a few
    massive channels dominate it, and the LM head barely reads them.)"""

    def __init__(self, reference: Transformer, ids: Tensor):
        self.head = reference.config.head
        self.ids = ids[:4]  # (b, T): enough to rank candidates, cheap to store
        self.ref = self._out(reference)  # (b, T, V) log-probs, (b, labels) log-probs, or (b, T, C) states

    @torch.no_grad()
    def distance(self, model: Transformer) -> float:
        out = self._out(model)
        if self.head == "none":
            return ((out - self.ref).pow(2).sum() / self.ref.pow(2).sum()).item()
        return (self.ref.exp() * (self.ref - out)).sum(-1).mean().item()

    @torch.no_grad()
    def _out(self, model: Transformer) -> Tensor:
        out = model.eval()(self.ids).float()
        return out if self.head == "none" else F.log_softmax(out, dim=-1)


def _layer(sd: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    pre = f"layers.{i}."
    return {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}


def _aligned(cfg: ModelConfig, model: Transformer, sd, ref: int, other: int, calib: Calibration) -> dict[str, Tensor]:
    """Layer `other`'s weights with its heads and neurons permuted to line up with layer `ref`'s (a permutation
    inside a block changes nothing it computes)."""
    H, KV, D, C = cfg.num_heads, cfg.n_kv_heads, cfg.dim_head, cfg.hidden_size
    g = H // KV
    w = _layer(sd, other)
    # Neurons, by the correlation of their activations on the calibration tokens.
    h_ref = mlp_hidden(cfg, sd, f"layers.{ref}.mlp.", calib.mlp_in[ref])
    h_oth = mlp_hidden(cfg, sd, f"layers.{other}.mlp.", calib.mlp_in[other])
    perm = match(correlation(h_ref, h_oth))
    for name in ("mlp.gate_proj", "mlp.up_proj") if cfg.mlp == "swiglu" else ("mlp.up_proj",):
        w[name + ".weight"] = w[name + ".weight"].index_select(0, perm)
        if cfg.mlp_bias:
            w[name + ".bias"] = w[name + ".bias"].index_select(0, perm)
    w["mlp.down_proj.weight"] = w["mlp.down_proj.weight"].index_select(1, perm)
    # KV groups, then query heads within matched groups, by the correlation of their outputs.
    y_ref = head_outputs(model, model.layers[ref].attn, calib.attn_in[ref])  # (N, H, D)
    y_oth = head_outputs(model, model.layers[other].attn, calib.attn_in[other])
    kv_perm = match(correlation(_per_group(y_ref, KV), _per_group(y_oth, KV)))
    head_perm = []
    for j in range(KV):
        r_heads, o_heads = torch.arange(j * g, (j + 1) * g), torch.arange(kv_perm[j] * g, (kv_perm[j] + 1) * g)
        a = y_ref.index_select(1, r_heads).transpose(0, 1).reshape(g, -1).T  # (N * D, g)
        b = y_oth.index_select(1, o_heads).transpose(0, 1).reshape(g, -1).T
        head_perm.append(o_heads[match(correlation(a, b))])
    head_perm = torch.cat(head_perm)

    def permute_rows(name: str, perm: Tensor, n: int) -> None:
        w[name + ".weight"] = w[name + ".weight"].view(n, D, C).index_select(0, perm).reshape(n * D, C)
        if cfg.qkv_bias:
            w[name + ".bias"] = w[name + ".bias"].view(n, D).index_select(0, perm).reshape(-1)

    permute_rows("attn.q_proj", head_perm, H)
    permute_rows("attn.k_proj", kv_perm, KV)
    permute_rows("attn.v_proj", kv_perm, KV)
    w["attn.o_proj.weight"] = w["attn.o_proj.weight"].view(C, H, D).index_select(1, head_perm).reshape(C, H * D)
    return w


def _per_group(y: Tensor, groups: int) -> Tensor:
    """(N, H, D) head outputs -> (N * H / groups * D, groups): one column per group of consecutive heads."""
    return y.reshape(y.shape[0], groups, -1).transpose(0, 1).reshape(groups, -1).T


def _merge_candidates(
    cfg, model, sd, group, influence, calib: Calibration, ridge: float | None
) -> list[dict[str, Tensor]]:
    """Candidate blocks for `group`, from its aligned blocks: readers averaged with weights proportional to
    influence, or the most influential block's alone, each with its writers refitted (pre-norm) and, for the
    latter, also as it is (plain layer dropping: fusion never does worse than it on the calibration tokens).
    Averaging helps when neighbours compute alike, and costs when they do not."""
    ref = max(group, key=lambda i: influence[i])
    blocks = [_layer(sd, ref) if i == ref else _aligned(cfg, model, sd, ref, i, calib) for i in group]
    by_influence = torch.tensor([max(influence[i], 0.0) for i in group], dtype=torch.float64) + 1e-12
    x_in = calib.hidden[group[0]].view(*calib.ids.shape, -1)  # (B, T, C)
    x_out = calib.hidden[group[-1] + 1]  # (N, C)
    # The group's update is the sum of its blocks' updates: with aligned blocks that compute alike, the sum of
    # their writers is the refit's prior.
    prior = {name: sum(b[name] for b in blocks) for name in blocks[0] if _part("layers.0." + name) in WRITERS}
    candidates = [_layer(sd, ref)]
    for share in (by_influence / by_influence.sum(), None):
        if share is None:  # the dominant block's readers alone
            merged = dict(candidates[0])
        else:
            merged = {name: sum(s * b[name] for s, b in zip(share.float(), blocks)) for name in blocks[0]}
        if cfg.norm_position == "pre":
            merged = _refit_writers(cfg, model, {**merged, **prior}, group, x_in, x_out, calib, ridge)
        candidates.append(merged)
    return candidates


def _refit_writers(cfg, model, merged: dict, group, x_in: Tensor, x_out: Tensor, calib, ridge) -> dict[str, Tensor]:
    """Pre-norm: the block must map the group's input x_in (B, T, C) to its output x_out (N, C). The attention
    writer reproduces the sum of the group's attention outputs; the MLP writer then whatever the group adds
    beyond that. The writers in `merged` are the refits' priors."""
    merged = dict(merged)
    block = type(model.layers[0])(cfg).eval()
    block.load_state_dict(merged)
    y = head_outputs(model, block.attn, block.attn_norm(x_in)).flatten(1)  # (N, H * D)
    attn_target = sum(calib.attn_out[i] for i in group)  # (N, C)
    w, b = refit(
        y,
        attn_target,
        bias=cfg.out_bias,
        ridge=ridge,
        prior=merged["attn.o_proj.weight"],
        prior_bias=merged.get("attn.o_proj.bias"),
    )
    merged["attn.o_proj.weight"] = w.float()
    if b is not None:
        merged["attn.o_proj.bias"] = b.float()
    block.load_state_dict(merged)
    x_mid = x_in + block.attn.o_proj(y.view(*x_in.shape[:2], -1))  # (B, T, C)
    h = mlp_hidden(cfg, merged, "mlp.", block.mlp_norm(x_mid).flatten(0, 1))
    w, b = refit(
        h,
        x_out - x_mid.flatten(0, 1),
        bias=cfg.mlp_bias,
        ridge=ridge,
        prior=merged["mlp.down_proj.weight"],
        prior_bias=merged.get("mlp.down_proj.bias"),
    )
    merged["mlp.down_proj.weight"] = w.float()
    if b is not None:
        merged["mlp.down_proj.bias"] = b.float()
    return merged

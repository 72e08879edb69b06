"""PSP++ held-out heads (Salesforce, US12072955B2): a small attention-only model trained on its own loss, whose
attention outputs the main model reads.

    x_0 = embed_proj(E[ids].detach())                  # (B, T, W): its own stream, from the main embedding, frozen
    for j < L:  h_j = heads_j(norm_j(x_j))            # (B, T, n*Dh): held-out attention outputs, one per lower layer
                x_{j+1} = x_j + o_j(h_j)
    logits = out_proj(norm(x_L)) @ E_out.detach().T    # its own LM loss through the main model's output embedding

Main layer j < L then computes o_proj([its heads' outputs ; h_j]): the held-out states are concatenated with the
main heads' outputs before the layer's output projection, detached (config.heldout_detach), so the main loss never
trains the held-out parameters; the held-out loss never trains the main ones, since the held-out model reads the
main embedding and output matrix detached. One backward pass of main loss + held-out loss therefore gives each
parameter set the gradient of its own loss only, as the method's two passes do.

Why a stream of its own rather than the main residual stream: the held-out forward must not depend on main
parameters it cannot train (their gradient would then have to be cut inside the main model), and a stream of its
own keeps "the held-out model" a model: it has its own loss at every step and a smaller width than the main one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig


class HeldOutLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from lmforge.model.transformer import RMSNorm

        W, self.n, self.d = cfg.heldout_stream, cfg.heldout_heads, cfg.heldout_dim_head
        self.norm = RMSNorm(W, cfg.norm_eps)
        self.q_proj = nn.Linear(W, self.n * self.d, bias=False)
        self.k_proj = nn.Linear(W, self.n * self.d, bias=False)
        self.v_proj = nn.Linear(W, self.n * self.d, bias=False)
        self.o_proj = nn.Linear(self.n * self.d, W, bias=False)

    def forward(self, x: Tensor, rope, mask, is_causal: bool, cache=None, layer: int = 0) -> tuple[Tensor, Tensor]:
        """x (B, T, W) -> (the stream after this layer, the heads' outputs (B, T, n*Dh))."""
        from lmforge.model.transformer import apply_rope

        B, T, _ = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(B, T, self.n, self.d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, n, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n * self.d)
        return x + self.o_proj(y), y


class HeldOut(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from lmforge.model.transformer import RMSNorm, rope_inv_freq

        W = cfg.heldout_stream
        self.embed_proj = nn.Linear(cfg.hidden_size, W, bias=False)
        self.layers = nn.ModuleList(HeldOutLayer(cfg) for _ in range(cfg.heldout_layers))
        self.norm = RMSNorm(W, cfg.norm_eps)
        self.out_proj = nn.Linear(W, cfg.hidden_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.replace(head_dim=cfg.heldout_dim_head)), persistent=False)

    def forward(
        self, embedded: Tensor, positions: Tensor, mask, is_causal: bool, cache=None, first_layer: int = 0
    ) -> tuple[list[Tensor], Tensor]:
        """embedded (B, T, C), the main token embeddings (detached by the caller) -> (each layer's head outputs
        [(B, T, n*Dh)] * L, the final stream (B, T, W)). Cache entries first_layer + j hold layer j's keys."""
        from lmforge.model.transformer import rope_cos_sin

        x = self.embed_proj(embedded)
        rope = rope_cos_sin(self.inv_freq, positions, x.dtype)  # at the held-out head size
        states = []
        for j, layer in enumerate(self.layers):
            x, y = layer(x, rope, mask, is_causal, cache, first_layer + j)
            states.append(y)
        return states, self.norm(x)

    def logits(self, final: Tensor, output_embedding: Tensor) -> Tensor:
        """The held-out LM head: (B, T, W) -> (B, T, V) through the main output embedding (V, C), not trained here."""
        return F.linear(self.out_proj(final), output_embedding.detach())

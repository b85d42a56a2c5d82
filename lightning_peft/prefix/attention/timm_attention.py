"""Prefixes for timm's ``Attention`` (ViT, DeiT, ...): fused ``qkv`` projection computed inside ``forward``.

timm computes q, k, v inline, so the adapter owns the whole forward and mirrors timm's (qkv, q/k norms,
attention, scale norm, output gate, projection, dropouts) with the prefix prepended to the keys and values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_peft.imported import imported_class
from lightning_peft.prefix.attention.base import (
    PrefixAttention,
    PrefixShape,
    additive_mask,
    causal_bias,
    prefixed_attention,
)

if TYPE_CHECKING:
    from timm.layers.attention import Attention


class TimmPrefixAttention(PrefixAttention):
    """timm ``Attention`` with a prefix; takes timm's ``(x, attn_mask=None, is_causal=False)``."""

    family = "timm Attention"
    base_layer: Attention

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (b, h, n, d) each
        q, k = attn.q_norm(q), attn.k_norm(k)
        # as timm's unfused path: is_causal wins over a mask (its fused path refuses both); bool True means attend
        bias = causal_bias(n, n, q) if is_causal else additive_mask(attn_mask, q.dtype, keep_true=True)
        out, _ = prefixed_attention(self, q, k, v, bias, dropout=attn.attn_drop.p if self.training else 0.0,
                                    scale=attn.scale)
        out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))


def timm_shape(module: Attention) -> PrefixShape:
    """Heads and head width of a timm ``Attention``."""
    return PrefixShape(module.num_heads, module.head_dim, module.head_dim)


def is_timm_attention(module: nn.Module) -> bool:
    """Whether ``module`` is timm's ``Attention`` (checked only if timm is already imported)."""
    attention = imported_class("timm.layers.attention", "Attention")
    return attention is not None and type(module) is attention


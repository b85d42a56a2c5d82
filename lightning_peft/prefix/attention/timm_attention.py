"""Prefixes for timm's ``Attention`` (ViT, DeiT, ...): fused ``qkv`` projection computed inside ``forward``.

timm computes q, k, v inline, so the adapter owns the whole forward and mirrors timm's (qkv, q/k norms,
attention, scale norm, output gate, projection, dropouts) with the prefix prepended to the keys and values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lightning_peft.prefix.attention.base import (
    AttentionClass,
    PrefixAttention,
    additive_mask,
    causal_bias,
    head_dim_shape,
    prefixed_attention,
)

if TYPE_CHECKING:
    from timm.layers.attention import Attention


def timm_dropout(adapter: PrefixAttention) -> float:
    """The attention dropout timm applies: the base's ``attn_drop`` probability while training, none in eval."""
    attn: Any = adapter.base_layer
    return float(attn.attn_drop.p) if adapter.training else 0.0


def timm_fused_qkv(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """timm's fused ``qkv`` projection ``(..., 3·h·d)``, with the separate q/v biases and zero k bias of BEiT, EVA
    and Swin-V2 where the layer has them."""
    if attn.q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


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
        out, _ = prefixed_attention(self, q, k, v, bias, dropout=timm_dropout(self), scale=attn.scale)
        out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))


#: timm's ``Attention`` (exact type: the model files' own attention classes have their handlers).
TIMM_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass("timm.layers.attention", "Attention", TimmPrefixAttention, head_dim_shape),
)


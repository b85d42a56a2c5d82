"""Prefixes for timm's attention with a learned per-position bias table: LeViT and EfficientFormer.

These layers add ``attention_biases[:, attention_bias_idxs]`` (one learned scalar per head and relative offset
between two of a fixed grid's positions) to the scores, and give keys and values different widths
(``val_dim = attn_ratio · key_dim``). A prefix position sits on no grid, so its columns get no bias::

    scores = [q P_k^T · scale ,  q k^T · scale + attention_biases[:, idxs]]    (b, h, n_q, p + n)

The prefix enters after the fused projection and the BatchNorm inside it (LeViT's ``LinearNorm``/``ConvNorm``);
the bias comes from the base's own ``get_attention_biases`` (its eval-mode cache behaves as without the adapter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import torch

from lightning_peft.prefix.attention.base import AttentionClass, PrefixAttention, prefixed_attention

if TYPE_CHECKING:
    from timm.models.efficientformer import Attention as EfficientFormerAttention
    from timm.models.levit import Attention as LevitAttention
    from timm.models.levit import AttentionDownsample as LevitAttentionDownsample

    BiasTableAttention: TypeAlias = LevitAttention | LevitAttentionDownsample | EfficientFormerAttention


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Tokens ``(b, n, h·d)``, or a LeViT ``use_conv`` map ``(b, h·d, H, W)``, as ``(b, h, n, d)`` (head-major)."""
    tokens = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x
    return tokens.unflatten(-1, (heads, -1)).transpose(1, 2)


class BiasTablePrefixAttention(PrefixAttention):
    """timm LeViT ``Attention``/``AttentionDownsample`` and EfficientFormer ``Attention`` with a prefix; takes the
    module's input, tokens ``(b, n, c)`` or LeViT ``use_conv`` feature maps ``(b, c, H, W)``.

    ``AttentionDownsample`` takes keys and values from every position (fused ``kv``) and queries from every
    ``stride``-th row and column (``q``); the prefix joins the keys and values.
    """

    base_layer: BiasTableAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x)
        heads, stride = attn.num_heads, getattr(attn, "stride", 1)
        if hasattr(attn, "kv"):  # AttentionDownsample
            k, v = _heads(attn.kv(x), heads).split([attn.key_dim, attn.val_dim], dim=-1)
            q = _heads(attn.q(x), heads)
        else:
            q, k, v = _heads(attn.qkv(x), heads).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=-1)
        bias = attn.get_attention_biases(x.device).to(q.dtype)  # (h, n_q, n): real keys only; prefix columns get 0
        out = prefixed_attention(self, q, k, v, bias, scale=attn.scale)[0].transpose(1, 2).flatten(2)  # (b, n_q, h·d_v)
        if getattr(attn, "use_conv", False):  # back to a map of the queries' grid, timm's (H - 1) // stride + 1
            out = out.transpose(1, 2).reshape(x.shape[0], -1, (x.shape[-2] - 1) // stride + 1,
                                              (x.shape[-1] - 1) // stride + 1)
        return attn.proj(out)


#: LeViT and EfficientFormer attention (exact types).
TIMM_BIASED_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass("timm.models.levit", "Attention", BiasTablePrefixAttention),
    AttentionClass("timm.models.levit", "AttentionDownsample", BiasTablePrefixAttention),
    AttentionClass("timm.models.efficientformer", "Attention", BiasTablePrefixAttention),
)

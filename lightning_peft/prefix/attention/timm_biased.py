"""Prefixes for timm's attention with a learned per-position bias table: LeViT and EfficientFormer.

These layers add ``attention_biases[:, attention_bias_idxs]`` (one learned scalar per head and relative offset
between two of a fixed grid's positions) to the scores, and give keys and values different widths
(``val_dim = attn_ratio · key_dim``). A prefix position sits on no grid, so its columns get no bias and every
query sees them::

    scores = [q P_k^T · scale ,  q k^T · scale + attention_biases[:, idxs]]    (b, h, n_q, p + n)
    output = softmax(scores) [P_v ; v]                                        (b, h, n_q, d_v)

The prefix enters where the real keys and values do, after the fused projection and the norm inside it (LeViT's
``LinearNorm``/``ConvNorm`` is a linear or 1x1 convolution followed by BatchNorm). The bias comes from the base's
own ``get_attention_biases``, so its eval-mode cache behaves as without the adapter.
(TinyViT's attention, also biased, calls ``F.scaled_dot_product_attention``: :mod:`.sdpa` adapts it.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import torch

from lightning_peft.prefix.attention.base import AttentionClass, PrefixAttention, prefixed_attention

if TYPE_CHECKING:
    from timm.models.efficientformer import Attention as EfficientFormerAttention
    from timm.models.levit import Attention as LevitAttention
    from timm.models.levit import AttentionDownsample as LevitAttentionDownsample

    BiasTableAttention: TypeAlias = (
        LevitAttention | LevitAttentionDownsample | EfficientFormerAttention
    )


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """A LeViT ``use_conv`` feature map ``(b, c, H, W)`` as tokens ``(b, H·W, c)``; tokens pass unchanged."""
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Tokens ``(b, n, heads·d)`` (features head-major, as timm lays them out) as ``(b, heads, n, d)``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class _BiasTablePrefixAttention(PrefixAttention):
    """The forward these families share: project, attend over ``[prefix; keys]`` with the base's bias, project out.

    Subclasses say how queries, keys and values come out of the input (:meth:`fused_qkv` or :meth:`project`)
    and how the output is laid out again (:meth:`heads_out`); ``base_layer`` has ``get_attention_biases``, ``scale``
    and ``proj``.
    """

    base_layer: BiasTableAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x)
        q, k, v = self.project(x)  # (b, h, n_q, d_k), (b, h, n, d_k), (b, h, n, d_v)
        bias = attn.get_attention_biases(x.device).to(q.dtype)  # (h, n_q, n): real keys only; prefix columns get 0
        out, _ = prefixed_attention(self, q, k, v, bias, scale=attn.scale)
        return attn.proj(self.heads_out(out, x))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``(b, h, n, d)``: the fused projection split per head into d_k, d_k, d_v."""
        attn = self.base_layer
        q, k, v = _heads(self.fused_qkv(x), attn.num_heads).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=-1)
        return q, k, v

    def fused_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The base's ``qkv`` projection as tokens ``(b, n, h·(2·d_k + d_v))``."""
        return self.base_layer.qkv(x)

    def heads_out(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Heads ``(b, h, n_q, d_v)`` back to tokens ``(b, n_q, h·d_v)``, the layout ``proj`` reads."""
        return out.transpose(1, 2).flatten(2)


class EfficientFormerPrefixAttention(_BiasTablePrefixAttention):
    """timm EfficientFormer ``Attention`` (fixed 7x7 tokens, per-position bias table) with a prefix."""

    family = "timm EfficientFormer Attention"
    base_layer: EfficientFormerAttention


class LevitPrefixAttention(_BiasTablePrefixAttention):
    """timm LeViT ``Attention`` with a prefix; tokens ``(b, n, c)``, or feature maps ``(b, c, H, W)`` (``use_conv``)."""

    family = "timm LeViT Attention"
    base_layer: LevitAttention | LevitAttentionDownsample

    def fused_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(self.base_layer.qkv(x))

    def heads_out(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tokens = super().heads_out(out, x)  # (b, n_q, h·d_v)
        if not self.base_layer.use_conv:
            return tokens
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid(x))  # (b, h·d_v, H', W')

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Rows and columns of the queries' grid (``use_conv``): the input's."""
        return x.shape[-2], x.shape[-1]


class LevitDownsamplePrefixAttention(LevitPrefixAttention):
    """timm LeViT ``AttentionDownsample`` with a prefix: keys and values from every position (fused ``kv``),
    queries from a subsampled grid (``q``); the prefix joins the keys and values."""

    family = "timm LeViT AttentionDownsample"
    base_layer: LevitAttentionDownsample

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.base_layer
        k, v = _heads(_tokens(attn.kv(x)), attn.num_heads).split([attn.key_dim, attn.val_dim], dim=-1)
        q = _heads(_tokens(attn.q(x)), attn.num_heads)  # (b, h, n_q, d_k)
        return q, k, v

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Every ``stride``-th row and column of the input (as timm's ``(H - 1) // stride + 1``)."""
        stride = self.base_layer.stride
        return (x.shape[-2] - 1) // stride + 1, (x.shape[-1] - 1) // stride + 1


#: LeViT and EfficientFormer attention (exact types): learned per-position bias tables, keys ``key_dim``
#: and values ``val_dim`` wide per head.
TIMM_BIASED_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass("timm.models.levit", "Attention", LevitPrefixAttention),
    AttentionClass("timm.models.levit", "AttentionDownsample", LevitDownsamplePrefixAttention),
    AttentionClass("timm.models.efficientformer", "Attention", EfficientFormerPrefixAttention),
)

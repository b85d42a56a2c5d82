"""Prefixes for timm attention classes beyond ViT's: BEiT, EVA / EVA-02, PVTv2, CoAtNet and MaxViT.

Like :mod:`.timm_attention`, each adapter owns the forward and mirrors timm's, with the prefix prepended to the
keys and values after projection (queries untouched, outputs keep their rows)::

    BEiT   Attention       q, k, v = qkv(x) (+ q/v bias, zero k bias)     bias: rel-pos table (+ shared), real keys
    EVA    EvaAttention    fused or separate q/k/v, q/k norm, RoPE on     bias: attn_mask / causal, real keys
                           patch tokens only; the prefix is not rotated
    PVTv2  Attention       k, v = kv(reduce(x)): sr conv + norm, or       no bias
                           pool + 1x1 conv + norm + GELU (linear attn)
    MaxxViT Attention2d    NCHW: H·W positions, rel-pos bias              bias: rel_pos or shared, real keys
    MaxxViT AttentionCl    channels-last windows / grids (batch rows)     bias: rel_pos or shared, real keys

The prefix columns get no relative-position bias (0, they have no position) and every query sees them. MaxViT
attends inside windows and grid cells that timm folds into the batch, so each window sees the same per-layer
prefix. EdgeNeXt's cross-covariance attention is refused by definition (:func:`prefix_undefined`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_peft.imported import imported_class
from lightning_peft.prefix.attention.base import (
    AttentionClass,
    PrefixAttention,
    PrefixShape,
    additive_mask,
    causal_bias,
    fused_qkv_shape,
    head_dim_shape,
    prefixed_attention,
)
from lightning_peft.prefix.attention.timm_attention import timm_dropout, timm_fused_qkv

if TYPE_CHECKING:
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention
    from timm.models.maxxvit import Attention2d, AttentionCl
    from timm.models.pvt_v2 import Attention as PvtAttention


class BeitPrefixAttention(PrefixAttention):
    """BEiT ``Attention`` with a prefix; takes timm's ``(x, shared_rel_pos_bias=None)``."""

    family = "timm BEiT Attention"
    base_layer: BeitAttention

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, shared_rel_pos_bias=shared_rel_pos_bias)
        b, n, _ = x.shape
        q, k, v = timm_fused_qkv(attn, x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None  # (1, h, n, n)
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        out, _ = prefixed_attention(self, q, k, v, bias, dropout=timm_dropout(self), scale=attn.scale)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, -1)))


class EvaPrefixAttention(PrefixAttention):
    """EVA / EVA-02 ``EvaAttention`` with a prefix; takes timm's ``(x, rope=None, attn_mask=None, is_causal=False)``.

    RoPE rotates the patch tokens' queries and keys (not the class token's); the prefix keys are learned after
    rotation and enter unrotated, as for the rotary transformers models.
    """

    family = "timm EvaAttention"
    base_layer: EvaAttention

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        if attn.qkv is not None:
            q, k, v = timm_fused_qkv(attn, x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)  # (b, h, n, d)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            q, k = _rotate_patch_tokens(attn, q, rope).type_as(v), _rotate_patch_tokens(attn, k, rope).type_as(v)
        # as timm's unfused path: is_causal wins over a mask; bool True means attend
        bias = causal_bias(n, n, q) if is_causal else additive_mask(attn_mask, q.dtype, keep_true=True)
        out, _ = prefixed_attention(self, q, k, v, bias, dropout=timm_dropout(self), scale=attn.scale)
        out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))


def _rotate_patch_tokens(attn: EvaAttention, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """RoPE on positions ``num_prefix_tokens:`` of ``x (b, h, n, d)``; the class/register tokens stay as they are."""
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    rotated = apply_rot_embed_cat(x[:, :, npt:], rope, half=getattr(attn, "rotate_half", False))
    return torch.cat([x[:, :, :npt], rotated], dim=2)


class PvtV2PrefixAttention(PrefixAttention):
    """PVTv2 spatial-reduction ``Attention`` with a prefix; takes timm's ``(x, feat_size)``.

    Keys and values come from the reduced sequence (``H·W / sr²`` tokens, or 49 pooled ones in the linear
    variant); the prefix is prepended to those.
    """

    family = "timm PVTv2 Attention"
    base_layer: PvtAttention

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, feat_size)
        b, n, c = x.shape
        q = attn.q(x).reshape(b, n, attn.num_heads, -1).permute(0, 2, 1, 3)  # (b, h, n, d)
        reduced = _reduce(attn, x, feat_size)  # (b, m, c)
        kv = attn.kv(reduced).reshape(b, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (b, h, m, d)
        out, _ = prefixed_attention(self, q, k, v, None, dropout=timm_dropout(self), scale=attn.scale)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, c)))


def _reduce(attn: PvtAttention, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
    """The sequence PVTv2's keys and values are computed from: ``x`` itself, or its spatial reduction."""
    if attn.sr is None:
        return x
    b, _, c = x.shape
    grid = x.permute(0, 2, 1).reshape(b, c, *feat_size)  # (b, c, H, W)
    if attn.pool is not None:  # linear attention: pool to 7x7, 1x1 conv, norm, GELU
        return attn.act(attn.norm(attn.sr(attn.pool(grid)).reshape(b, c, -1).permute(0, 2, 1)))
    return attn.norm(attn.sr(grid).reshape(b, c, -1).permute(0, 2, 1))


def _maxxvit_bias(attn: Attention2d | AttentionCl, shared_rel_pos: torch.Tensor | None) -> torch.Tensor | None:
    """The module's own relative-position bias ``(1, h, n, n)`` if it has one, else the shared one (as timm)."""
    return attn.rel_pos.get_bias() if attn.rel_pos is not None else shared_rel_pos


class Attention2dPrefixAttention(PrefixAttention):
    """CoAtNet's NCHW ``Attention2d`` with a prefix; takes timm's ``(x, shared_rel_pos=None)``."""

    family = "timm MaxxViT Attention2d"
    base_layer: Attention2d

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, shared_rel_pos=shared_rel_pos)
        b, _, height, width = x.shape
        if attn.head_first:
            q, k, v = attn.qkv(x).view(b, attn.num_heads, attn.dim_head * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = attn.qkv(x).reshape(b, 3, attn.num_heads, attn.dim_head, -1).unbind(1)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # (b, h, d, H·W) -> (b, h, H·W, d)
        out, _ = prefixed_attention(self, q, k, v, _maxxvit_bias(attn, shared_rel_pos),
                                    dropout=timm_dropout(self), scale=attn.scale)
        out = out.transpose(-1, -2).reshape(b, -1, height, width)  # (b, h·d, H, W)
        return attn.proj_drop(attn.proj(out))


class AttentionClPrefixAttention(PrefixAttention):
    """MaxViT's channels-last ``AttentionCl`` with a prefix; takes timm's ``(x, shared_rel_pos=None)``.

    ``x`` is ``(b, ..., c)``: the block and grid partitions arrive as ``(b · windows, wh, ww, c)``, so each window
    attends over the prefix and its own ``wh · ww`` tokens.
    """

    family = "timm MaxxViT AttentionCl"
    base_layer: AttentionCl

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, shared_rel_pos=shared_rel_pos)
        b, rows = x.shape[0], x.shape[:-1]
        if attn.head_first:
            qkv = attn.qkv(x).view(b, -1, attn.num_heads, attn.dim_head * 3).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=3)  # (b, h, n, d)
        else:
            q, k, v = attn.qkv(x).reshape(b, -1, 3, attn.num_heads, attn.dim_head).transpose(1, 3).unbind(2)
        out, _ = prefixed_attention(self, q, k, v, _maxxvit_bias(attn, shared_rel_pos),
                                    dropout=timm_dropout(self), scale=attn.scale)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(*rows, -1)))


def _dim_head_shape(module: Any) -> PrefixShape:
    return PrefixShape(module.num_heads, module.dim_head, module.dim_head)


#: BEiT, EVA, PVTv2 and CoAtNet/MaxViT attention: classes of their own timm model files (exact types).
TIMM_VARIANT_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass("timm.models.beit", "Attention", BeitPrefixAttention, fused_qkv_shape),
    AttentionClass("timm.models.eva", "EvaAttention", EvaPrefixAttention, head_dim_shape),
    AttentionClass("timm.models.pvt_v2", "Attention", PvtV2PrefixAttention, head_dim_shape),
    AttentionClass("timm.models.maxxvit", "Attention2d", Attention2dPrefixAttention, _dim_head_shape),
    AttentionClass("timm.models.maxxvit", "AttentionCl", AttentionClPrefixAttention, _dim_head_shape),
)


#: Attention whose definition leaves no place for a token prefix: (timm module, class).
_CHANNEL_ATTENTION = (("timm.models.edgenext", "CrossCovarianceAttn"), ("timm.models.xcit", "XCA"))


def prefix_undefined(module: nn.Module) -> str | None:
    """Why prefix tuning is not defined for ``module``'s attention, or ``None`` if nothing rules it out.

    Cross-covariance attention (XCA: EdgeNeXt, XCiT) attends over channels: per head, ``softmax(q̂ k̂ᵀ · τ)`` is a
    ``d x d`` channel map, the token axis is what ``q̂ k̂ᵀ`` sums over, and ``A v`` keeps ``n`` tokens per channel.
    Prepending ``p`` tokens to ``k`` and ``v`` leaves ``q k'ᵀ`` undefined (``n`` vs ``p + n`` tokens) and would
    give ``p + n`` output tokens; the only extra attended positions are extra channels, whose values would be
    rows of ``n`` tokens, tied to one image size. There is no exact token prefix in the paper's sense.
    """
    for module_name, class_name in _CHANNEL_ATTENTION:
        if type(module) is imported_class(module_name, class_name):
            return (f"{class_name} is cross-covariance attention (XCA), which attends over channels, not tokens: "
                    "there are no key/value positions along the sequence to prepend a prefix to")
    return None

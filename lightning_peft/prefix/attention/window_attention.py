"""Prefixes for window attention, which computes its scores by hand: Swin's (torchvision ``ShiftedWindowAttention``
v1/v2, timm ``WindowAttention`` of ``swin_transformer`` and ``swin_transformer_v2``) and torchvision MaxViT's block
and grid attention (``RelativePositionalMultiHeadAttention``). Every window (or grid cell) gets the layer's same
``p`` prefix keys and values, as VPT-deep on Swin::

    q, k, v: (B·nW, h, N, d)   ──►   k', v': (B·nW, h, p + N, d)
    scores = q k'^T · scale + [0 | relative position bias + shift mask]: (B·nW, h, N, p + N)

The prefix columns get no relative position bias (they have no position in the window) and no shift mask (it only
separates tokens the cyclic shift brought together). With cosine attention (v2) the prefix keys are normalised like
the real keys. None of these classes exposes q, k, v, so each adapter owns the forward and mirrors the base's
(torchvision: padding, cyclic shift and window partition; timm v2: the separate q/v biases). timm's v1 calls SDPA
only with its experimental ``fused_attn`` (off by default); the adapter computes the same attention either way.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from lightning_peft.prefix.attention.base import (
    AttentionClass,
    PrefixAttention,
    prefixed_attention,
)

if TYPE_CHECKING:
    from timm.models.swin_transformer import WindowAttention
    from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    from torchvision.models.swin_transformer import ShiftedWindowAttention


def _timm_qkv(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """timm's fused ``qkv`` projection ``(..., 3·h·d)``, with Swin-V2's separate q/v biases where it has them."""
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


def windowed_attention(adapter: PrefixAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       relative: torch.Tensor, mask: torch.Tensor | None, *, dropout: float, scale: float,
                       logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention inside each window over the adapter's prefix and the window's keys: ``(B·nW, h, N, d)``.

    ``q, k, v`` are ``(B·nW, h, N, d)``, windows batch-major; ``relative`` the bias ``(1, h, N, N)`` and ``mask`` the
    additive shift mask ``(nW, N, N)`` (or ``None``) of the real keys. ``logit_scale`` (cosine attention, Swin v2):
    the log of the per-head scale ``(h, 1, 1)``, clamped at ``log(100)``; queries and keys are L2-normalised.
    """
    bias = relative
    if mask is not None:
        windows = mask.shape[0]
        bias = relative.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)  # (1, nW, h, N, N)
        bias = bias.expand(q.shape[0] // windows, -1, -1, -1, -1).reshape(q.shape[0], *bias.shape[2:])
    bias = bias.to(q.dtype)
    if logit_scale is None:
        return prefixed_attention(adapter, q, k, v, bias, dropout=dropout, scale=scale)[0]
    q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(100.0)).exp().to(q.dtype)
    return prefixed_attention(adapter, q, k, v, bias, dropout=dropout, scale=1.0,
                              key_norm=functools.partial(F.normalize, dim=-1))[0]


def _partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` → windows ``(B·nW, Wh·Ww, C)``, batch-major, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window[0] * window[1], c)


def _merge(windows: torch.Tensor, batch: int, height: int, width: int, window: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`_partition`: ``(B·nW, Wh·Ww, C)`` → ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(batch, height // window[0], width // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, c)


def _shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                like: torch.Tensor) -> torch.Tensor:
    """``(nW, N, N)``: -100 between tokens of a window that the cyclic shift brought from different regions."""
    region = like.new_zeros(height, width)
    label = 0
    for top, bottom in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for left, right in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[top:bottom, left:right] = label
            label += 1
    region = _partition(region[None, :, :, None], window)[..., 0]  # (nW, N)
    apart = region.unsqueeze(1) != region.unsqueeze(2)
    return region.new_zeros(apart.shape).masked_fill(apart, -100.0)


class TorchvisionWindowPrefixAttention(PrefixAttention):
    """torchvision ``ShiftedWindowAttention`` with a prefix in every window; takes ``x (B, H, W, C)``."""

    base_layer: ShiftedWindowAttention
    cosine: ClassVar[bool] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x)
        b, h, w, _ = x.shape
        window = (attn.window_size[0], attn.window_size[1])
        x = F.pad(x, (0, 0, 0, -w % window[1], 0, -h % window[0]))  # to multiples of the window
        padded_h, padded_w = x.shape[1], x.shape[2]
        # no shift along an axis the window already covers (as torchvision)
        shift = (attn.shift_size[0] if window[0] < padded_h else 0, attn.shift_size[1] if window[1] < padded_w else 0)
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = _partition(x, window)
        n, c = windows.shape[1], windows.shape[2]
        qkv = F.linear(windows, attn.qkv.weight, self._qkv_bias())
        q, k, v = qkv.reshape(-1, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = _shift_mask(padded_h, padded_w, window, shift, x) if any(shift) else None
        out = windowed_attention(
            self, q, k, v, attn.get_relative_position_bias(), mask,
            dropout=attn.attention_dropout if attn.training else 0.0, scale=(c // attn.num_heads) ** -0.5,
            logit_scale=attn.logit_scale if self.cosine else None,
        )
        out = F.linear(out.transpose(1, 2).reshape(-1, n, c), attn.proj.weight, attn.proj.bias)
        out = _merge(F.dropout(out, p=attn.dropout, training=attn.training), b, padded_h, padded_w, window)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :h, :w].contiguous()

    def _qkv_bias(self) -> torch.Tensor | None:
        """The ``qkv`` bias as torchvision applies it: v2 (cosine attention) zeroes its key third."""
        bias = self.base_layer.qkv.bias
        if bias is None or not self.cosine:
            return bias
        third = bias.numel() // 3
        return torch.cat([bias[:third], torch.zeros_like(bias[third:2 * third]), bias[2 * third:]])


class TorchvisionWindowV2PrefixAttention(TorchvisionWindowPrefixAttention):
    """torchvision ``ShiftedWindowAttentionV2`` (cosine attention, log-spaced continuous position bias)."""

    cosine = True


class TimmWindowPrefixAttention(PrefixAttention):
    """timm ``swin_transformer.WindowAttention`` with a prefix in every window; takes ``(x, mask=None)``."""

    base_layer: WindowAttention
    cosine: ClassVar[bool] = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x, mask=mask)
        windows, n, _ = x.shape
        qkv = _timm_qkv(attn, x).reshape(windows, n, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B·nW, h, N, d) each
        out = windowed_attention(self, q, k, v, self._relative_bias(n), mask,
                                 dropout=float(attn.attn_drop.p) if self.training else 0.0,
                                 scale=1.0 if self.cosine else attn.scale,
                                 logit_scale=attn.logit_scale if self.cosine else None)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(windows, n, -1)))

    def _relative_bias(self, n: int) -> torch.Tensor:
        """``(1, h, N, N)``: the layer's relative position bias."""
        return self.base_layer._get_rel_pos_bias()


class TimmWindowV2PrefixAttention(TimmWindowPrefixAttention):
    """timm ``swin_transformer_v2.WindowAttention`` (cosine attention) with a prefix; takes ``(x, mask=None)``."""

    base_layer: WindowAttentionV2
    cosine = True

    def _relative_bias(self, n: int) -> torch.Tensor:
        """``(1, h, N, N)``: the continuous position bias MLP's table, gathered per pair, ``16·sigmoid``."""
        attn = self.base_layer
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
        bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias).unsqueeze(0)


class TorchvisionMaxVitPrefixAttention(PrefixAttention):
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention`` with a prefix in every window (block attention)
    and every grid cell (grid attention); takes ``x (B, G, P, D)``.

    torchvision multiplies the keys by ``feat_dim ** -0.5`` (the layer's width, not a head's) before scoring;
    the prefix keys are scored at that same scale.
    """

    base_layer: RelativePositionalMultiHeadAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.base_layer
        if not self.enabled:
            return attn(x)
        b, groups, tokens, _ = x.shape
        qkv = attn.to_qkv(x).reshape(b * groups, tokens, 3, attn.n_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B·G, h, P, d): torchvision's chunk(3) then heads
        out, _ = prefixed_attention(self, q, k, v, attn.get_relative_positional_bias(), scale=attn.scale_factor)
        return attn.merge(out.transpose(1, 2).reshape(b, groups, tokens, -1))


_SWIN = "torchvision.models.swin_transformer"

#: Swin window attention of torchvision and timm (exact classes: torchvision's v2 subclasses its v1), and
#: torchvision MaxViT's block/grid attention.
WINDOW_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass(_SWIN, "ShiftedWindowAttention", TorchvisionWindowPrefixAttention),
    AttentionClass(_SWIN, "ShiftedWindowAttentionV2", TorchvisionWindowV2PrefixAttention),
    AttentionClass("timm.models.swin_transformer", "WindowAttention", TimmWindowPrefixAttention),
    AttentionClass("timm.models.swin_transformer_v2", "WindowAttention", TimmWindowV2PrefixAttention),
    AttentionClass("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention",
                   TorchvisionMaxVitPrefixAttention),
)

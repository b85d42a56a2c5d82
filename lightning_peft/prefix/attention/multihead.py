"""Prefixes for ``nn.MultiheadAttention`` (torchvision ViT, ``nn.TransformerEncoderLayer``, user models).

``nn.MultiheadAttention`` projects and attends inside one fused call, so the adapter owns the forward: it
projects with the module's own weights, prepends the prefix to the projected keys and values, and attends.
(Running the module's own forward under the SDPA seam of :mod:`.sdpa` does not work here: torch's
``multi_head_attention_forward`` dispatches through ``__torch_function__`` itself, so the SDPA call inside it
runs with the mode switched off; and with ``need_weights=True``, torch's default, it calls no SDPA at all.)
``batch_first``, ``key_padding_mask``, ``attn_mask`` (bool or float, 2-D or per head), ``is_causal``,
``bias_k``/``bias_v``, ``add_zero_attn``, ``need_weights`` and ``average_attn_weights`` keep their meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.prefix.attention.base import (
    PrefixAttention,
    causal_bias,
    prefixed_attention,
)


class MultiheadPrefixAttention(PrefixAttention):
    """``nn.MultiheadAttention`` with a prefix; the forward takes the same arguments as the module's."""

    base_layer: nn.MultiheadAttention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mha = self.base_layer
        if not self.enabled:
            return mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if query.is_nested:
            raise ValueError("prefix tuning on nn.MultiheadAttention does not take nested tensors; pass padded "
                             "inputs with a key_padding_mask (TransformerEncoder(enable_nested_tensor=False)).")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif mha.batch_first:  # (b, L, E) -> (L, b, E), torch's internal layout
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value)  # (b, h, L, d), (b, h, S, d)
        bias = self._bias(q, k.shape[-2], key_padding_mask, attn_mask, is_causal)
        if mha.bias_k is not None and mha.bias_v is not None:  # add_bias_kv: one learned key/value after the tokens
            k = torch.cat([k, self._heads(mha.bias_k.expand(1, q.shape[0], -1))], dim=-2)
            v = torch.cat([v, self._heads(mha.bias_v.expand(1, q.shape[0], -1))], dim=-2)
            bias = F.pad(bias, (0, 1)) if bias is not None else None
        if mha.add_zero_attn:
            k = torch.cat([k, k.new_zeros(*k.shape[:-2], 1, k.shape[-1])], dim=-2)
            v = torch.cat([v, v.new_zeros(*v.shape[:-2], 1, v.shape[-1])], dim=-2)
            bias = F.pad(bias, (0, 1)) if bias is not None else None
        out, weights = prefixed_attention(self, q, k, v, bias, dropout=mha.dropout if self.training else 0.0,
                                          need_weights=need_weights)
        b, h, n, d = out.shape
        out = F.linear(out.permute(2, 0, 1, 3).reshape(n, b, h * d), mha.out_proj.weight, mha.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif mha.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(L, b, E)`` -> ``(b, h, L, E / h)``."""
        length, batch, width = x.shape
        heads = self.base_layer.num_heads  # the width is explicit: -1 is ambiguous for an empty batch
        return x.reshape(length, batch, heads, width // heads).permute(1, 2, 0, 3)

    def _project(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mha = self.base_layer
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        (w_q, w_k, w_v), (b_q, b_k, b_v) = weights, biases
        return (self._heads(F.linear(query, w_q, b_q)), self._heads(F.linear(key, w_k, b_k)),
                self._heads(F.linear(value, w_v, b_v)))

    def _bias(self, q: torch.Tensor, kv_len: int, key_padding_mask: torch.Tensor | None,
              attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
        """One additive ``(b, h|1, L, S)`` mask from torch's conventions (bool True = do not attend)."""
        b, h, n, _ = q.shape
        bias = None
        if attn_mask is not None:
            bias = _additive(attn_mask, q.dtype)
            bias = bias.reshape(b, h, n, kv_len) if bias.dim() == 3 else bias  # (b·h, L, S) per head
        elif is_causal:
            bias = causal_bias(n, kv_len, q)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).reshape(b, 1, 1, kv_len)
            bias = padding if bias is None else bias + padding
        return bias


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask in torch's convention (bool: True where not to attend) as an additive float mask."""
    if mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))

"""Prefixes for the transformers families that compute attention inline, outside ``ALL_ATTENTION_FUNCTIONS``
(the seam of :mod:`.transformers_attention`): BLOOM and DeBERTa-v2, each at the narrowest seam its code offers.

* **BLOOM** (``BloomAttention``): the model's own ``forward`` runs with a :class:`_PrefixedCache` as
  ``layer_past``: the real cache (or none) gets the real keys and values, the attention gets ``[prefix; keys]``,
  ``[prefix; values]``. The attention mask and the ALiBi tensor (``slope · position`` per key) get ``p`` leading
  columns of 0: visible, and at the distance of token 0 (position 0), as if the prefix preceded the text (as HF
  PEFT's prefix-as-cache). With ``gate`` the prefix needs the queries and a softmax of its own: a forward hook
  keeps the fused ``query_key_value`` output, and a pre-hook on ``dense`` adds ``tanh(g) · attn(q, P_k, P_v)`` to
  its input, so the model's own dense, dropout and residual apply (a per-query ALiBi constant cancels in that
  softmax; ``output_attentions`` returns the model's weights over the real keys).
* **DeBERTa-v2** (``DisentangledSelfAttention``): scores built from content and relative positions in one
  expression, so the adapter owns the forward: the real-token scores exactly as the model, the prefix columns by
  content only (``q · P_k / sqrt(d · scale_factor)``: a prefix has no relative position, as T5's prefix columns
  get no position bias).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lightning_peft.prefix.attention.base import AttentionClass, PrefixAttention, attend, pad_columns

_BLOOM = "transformers.models.bloom.modeling_bloom"
_DEBERTA = "transformers.models.deberta_v2.modeling_deberta_v2"


class _PrefixedCache:
    """Stands in for ``layer_past``: real tokens go to the real cache, the attention gets ``[prefix; tokens]``."""

    def __init__(self, inner: Any, adapter: PrefixAttention) -> None:
        self._inner = inner
        self._adapter = adapter

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        if self._inner is not None:
            key, value = self._inner.update(key, value, *args, **kwargs)
        self._adapter.check_keys(key, value)
        return self._adapter.prepend(key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class BloomPrefixAttention(PrefixAttention):
    """``BloomAttention`` with a prefix; takes the module's own arguments (see the module docstring)."""

    base_layer: Any  # BloomAttention (transformers is not typed here)

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base, *args, **kwargs)
        self._signature = inspect.signature(base.forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        if self.gated:
            return self._gated_forward(bound)
        call, p = bound.arguments, self.num_tokens
        for name in ("attention_mask", "alibi"):  # BLOOM masks only through attention_mask (no is_causal)
            if call.get(name) is not None:
                call[name] = pad_columns(call[name], p)
        call["layer_past"] = _PrefixedCache(call.get("layer_past"), self)
        return self.base_layer(*bound.args, **bound.kwargs)

    def _gated_forward(self, bound: inspect.BoundArguments) -> Any:
        base, captured = self.base_layer, {}

        def keep_qkv(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            captured["qkv"] = output

        def add_prefix(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            q = base._reshape(captured.pop("qkv"))[0]  # (b, h, n, d)
            pk, pv = self.prefix_like(q, q)
            dropout = base.attention_dropout.p if self.training else 0.0
            extra, _ = attend(q, pk, pv, None, dropout=dropout, scale=base.inv_norm_factor, need_weights=False)
            extra = extra.transpose(1, 2).flatten(2)  # (b, n, h·d): dense's input
            return (args[0] + self.gate_value(extra) * extra.to(args[0].dtype), *args[1:])

        handles = [base.query_key_value.register_forward_hook(keep_qkv),
                   base.dense.register_forward_pre_hook(add_prefix)]
        try:
            output = base(*bound.args, **bound.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if "qkv" in captured:
            raise RuntimeError(
                "BloomAttention did not call its dense projection (pretraining_tp > 1 with slow_but_exact), where the "
                "gated prefix enters. Use PrefixTuning(gate=False) or slow_but_exact=False."
            )
        return output


class DebertaV2PrefixAttention(PrefixAttention):
    """DeBERTa-v2 ``DisentangledSelfAttention`` with a prefix; same arguments and outputs as the module."""

    base_layer: Any  # DisentangledSelfAttention

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False,
                query_states: torch.Tensor | None = None, relative_pos: torch.Tensor | None = None,
                rel_embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = self.base_layer
        if not self.enabled:
            return attn(hidden_states, attention_mask, output_attentions, query_states=query_states,
                        relative_pos=relative_pos, rel_embeddings=rel_embeddings)
        heads = attn.num_attention_heads
        query_states = hidden_states if query_states is None else query_states
        q = attn.transpose_for_scores(attn.query_proj(query_states), heads)  # (b·h, n, d)
        k = attn.transpose_for_scores(attn.key_proj(hidden_states), heads)
        v = attn.transpose_for_scores(attn.value_proj(hidden_states), heads)
        scale_factor = 1 + ("c2p" in attn.pos_att_type) + ("p2c" in attn.pos_att_type)
        scale = (torch.tensor(q.shape[-1], dtype=torch.float) * scale_factor).sqrt().to(q.dtype)
        scores = torch.bmm(q, k.transpose(-1, -2) / scale)  # the model's real-token scores, unchanged
        if attn.relative_attention:
            rel = attn.disentangled_attention_bias(q, k, relative_pos, attn.pos_dropout(rel_embeddings), scale_factor)
            scores = scores + rel
        b, n, s = scores.shape[0] // heads, scores.shape[1], scores.shape[2]
        scores = scores.view(b, heads, n, s).masked_fill(~attention_mask.bool(), torch.finfo(q.dtype).min)
        keys, values = self.prepend(k.view(b, heads, s, -1), v.view(b, heads, s, -1))  # (b, h, p + s, d)
        p = self.num_tokens
        prefix_scores = q.view(b, heads, n, -1) @ keys[..., :p, :].transpose(-1, -2) / scale  # content only
        if self.gated:
            probs = attn.dropout(scores.softmax(dim=-1))
            prefix_probs = attn.dropout(prefix_scores.softmax(dim=-1))
            context = probs @ values[..., p:, :] + self.gate_value(q) * (prefix_probs @ values[..., :p, :])
            weights = torch.cat([prefix_probs * self.gate_value(q), probs], dim=-1)
        else:
            weights = attn.dropout(torch.cat([prefix_scores, scores], dim=-1).softmax(dim=-1))
            context = weights @ values
        context = context.permute(0, 2, 1, 3).reshape(b, n, -1)
        return context, (weights if output_attentions else None)


#: BLOOM and DeBERTa-v2 attention (subclasses too): attention computed inside their own forward.
INLINE_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass(_BLOOM, "BloomAttention", BloomPrefixAttention, subclasses=True),
    AttentionClass(_DEBERTA, "DisentangledSelfAttention", DebertaV2PrefixAttention, subclasses=True),
)

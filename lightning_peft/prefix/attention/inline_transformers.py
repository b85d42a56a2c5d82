"""Prefixes for transformers families that compute attention inline: BLOOM, Falcon, DeBERTa-v2.

These attention modules never call ``ALL_ATTENTION_FUNCTIONS`` (the seam of :mod:`.transformers_attention`), so
each gets an adapter of its own, at the narrowest seam its code offers:

* **BLOOM, Falcon** (``BloomAttention``, ``FalconAttention`` in eager and sdpa): the model's own ``forward`` runs.
  Both call ``layer_past.update(key, value, layer_idx)`` after the projections (and rotary embeddings) and attend
  over what it returns. The adapter passes a :class:`_PrefixedCache` as ``layer_past``: it forwards the update to
  the real cache (or to none), so the cache holds real tokens only, and returns ``[prefix; keys]``,
  ``[prefix; values]``. The attention mask and the ALiBi tensor get ``p`` leading columns: mask columns that every
  query sees (0 for float masks, True for bool masks), causal models included.

  *ALiBi choice*: the prefix columns get the value 0 in the model's ALiBi tensor, which holds
  ``slope · position`` per key. That is the value of the first real token (position 0): query ``i`` sees the prefix
  at the distance it sees token 0, ``slope · pos_i`` below its own key, as if the prefix preceded the text (as HF
  PEFT's prefix-as-cache does). The model's tensor shapes are kept, so its own code runs unchanged.

  With ``gate`` the prefix needs the queries and a softmax of its own, which the cache seam does not give: the
  adapter captures the fused ``query_key_value`` output with a forward hook for the duration of the call, rebuilds
  the queries with the module's own ``_reshape``/``_split_heads`` (and the model's ``apply_rotary_pos_emb``), and
  adds ``tanh(g) · attn(q, P_k, P_v)`` to the input of the output projection ``dense`` (a forward pre-hook), so
  the model's own dense, dropout and residual apply to it. A per-query ALiBi constant cancels in that softmax, so
  the gated prefix has no ALiBi term. With ``output_attentions`` a gated layer returns the model's own weights over
  the real keys (the prefix's softmax is separate and not returned); in training, BLOOM's ``hidden_dropout`` and
  the residual apply to the prefix branch as to the rest, since it enters before ``dense``.

* **DeBERTa-v2** (``DisentangledSelfAttention``): no cache and scores built from content and relative positions
  in one expression, so the adapter owns the forward. It projects with the module's own layers, computes the
  real-token scores exactly as the model (content plus ``disentangled_attention_bias`` for c2p/p2c), and scores
  the prefix columns by content only: ``q · P_k / sqrt(d · scale_factor)``. The prefix has no relative position,
  so it gets no c2p/p2c term (as T5's prefix columns get no relative position bias).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_peft.imported import imported_class
from lightning_peft.prefix.attention.base import (
    AttentionClass,
    PrefixAttention,
    attend,
    pad_columns,
    prefixed_mask,
)

_BLOOM = "transformers.models.bloom.modeling_bloom"
_FALCON = "transformers.models.falcon.modeling_falcon"
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


class _CacheSeamPrefixAttention(PrefixAttention):
    """Shared by BLOOM and Falcon: the model's forward runs with a prefixed cache, or with the gate's two hooks."""

    base_layer: Any  # BloomAttention or FalconAttention (transformers is not typed here)

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base, *args, **kwargs)
        self._signature = inspect.signature(base.forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = self.base_layer
        if not self.enabled:
            return base(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        call = bound.arguments
        if self.gated:
            return self._gated_forward(bound)
        q_len = call["hidden_states"].shape[1]
        past = call.get("layer_past")
        past_len = past.get_seq_length(base.layer_idx) if past is not None else 0
        call["attention_mask"] = self._mask(call.get("attention_mask"), call["hidden_states"], q_len, past_len)
        if call.get("alibi") is not None:
            call["alibi"] = pad_columns(call["alibi"], self.num_tokens)  # 0: the prefix sits at position 0
        call["layer_past"] = _PrefixedCache(past, self)
        return base(*bound.args, **bound.kwargs)

    def _mask(self, mask: torch.Tensor | None, like: torch.Tensor, q_len: int, past_len: int) -> torch.Tensor | None:
        if mask is not None and mask.dim() != 4:
            raise ValueError(
                f"prefix tuning expects a 4-D attention mask in {type(self.base_layer).__name__}, got shape "
                f"{tuple(mask.shape)}. Use attn_implementation='sdpa' or 'eager'."
            )
        # without a mask the model would rely on is_causal (top-left once keys outnumber queries): spelled out
        return prefixed_mask(mask, self.num_tokens, q_len, past_len + q_len, self._causal(), like)

    def _causal(self) -> bool:
        return bool(getattr(self.base_layer, "is_causal", False))

    def _gated_forward(self, bound: inspect.BoundArguments) -> Any:
        base, captured, reached = self.base_layer, {}, []

        def keep_qkv(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            captured["qkv"] = output

        def add_prefix(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            reached.append(True)
            q = self._queries(captured["qkv"], bound.arguments)  # (b, h, n, d)
            pk, pv = self.prefix_like(q, q)  # key/value heads repeated to the query heads
            dropout = self._dropout(bound.arguments)
            extra, _ = attend(q, pk, pv, None, dropout=dropout, scale=base.inv_norm_factor, need_weights=False)
            b, h, n, d = extra.shape
            extra = extra.transpose(1, 2).reshape(b, n, h * d)
            return (args[0] + self.gate_value(extra) * extra.to(args[0].dtype), *args[1:])

        handles = [base.query_key_value.register_forward_hook(keep_qkv),
                   base.dense.register_forward_pre_hook(add_prefix)]
        try:
            output = base(*bound.args, **bound.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if not reached:
            raise RuntimeError(
                f"{type(base).__name__} did not call its dense projection (pretraining_tp > 1 with slow_but_exact?); "
                "the gated prefix cannot enter there. Use PrefixTuning(gate=False) or slow_but_exact=False."
            )
        return output

    def _queries(self, fused: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def _dropout(self, call: dict[str, Any]) -> float:
        return self.base_layer.attention_dropout.p if self.training else 0.0


class BloomPrefixAttention(_CacheSeamPrefixAttention):
    """``BloomAttention`` with a prefix; takes the module's own arguments (see the module docstring)."""

    family = "BLOOM attention"

    def _causal(self) -> bool:
        return False  # BLOOM masks only through attention_mask: without one it attends everywhere, prefix too

    def _queries(self, fused: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        return self.base_layer._reshape(fused)[0]


class FalconPrefixAttention(_CacheSeamPrefixAttention):
    """``FalconAttention`` (eager, sdpa) with a prefix; takes the module's own arguments."""

    family = "Falcon attention"

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:
        flash = imported_class(_FALCON, "FalconFlashAttention2")
        if flash is not None and isinstance(base, flash):
            raise ValueError(
                "prefix tuning on Falcon supports attn_implementation='sdpa' and 'eager', not flash attention "
                "(FalconFlashAttention2 passes a 2-D padding mask to flash kernels). Load the model with "
                "attn_implementation='sdpa'."
            )
        super().__init__(base, *args, **kwargs)

    def _queries(self, fused: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        base = self.base_layer
        query = base._split_heads(fused)[0]  # (b, n, h, d)
        b, n = query.shape[:2]
        query = query.transpose(1, 2).reshape(b, base.num_heads, n, base.head_dim)
        if call.get("alibi") is None:
            rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]] = sys.modules[_FALCON].apply_rotary_pos_emb
            cos, sin = call["position_embeddings"]
            query = rotate(query, query, cos, sin)[0]
        return query

    def _dropout(self, call: dict[str, Any]) -> float:
        # as Falcon: attention dropout on its ALiBi path only
        return super()._dropout(call) if call.get("alibi") is not None else 0.0


class DebertaV2PrefixAttention(PrefixAttention):
    """DeBERTa-v2 ``DisentangledSelfAttention`` with a prefix; same arguments and outputs as the module."""

    family = "DeBERTa-v2 disentangled attention"
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


#: BLOOM, Falcon and DeBERTa-v2 attention (subclasses too): attention computed inside their own forward.
INLINE_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass(_BLOOM, "BloomAttention", BloomPrefixAttention, subclasses=True),
    AttentionClass(_FALCON, "FalconAttention", FalconPrefixAttention, subclasses=True),
    AttentionClass(_DEBERTA, "DisentangledSelfAttention", DebertaV2PrefixAttention, subclasses=True),
)

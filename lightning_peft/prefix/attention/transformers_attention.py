"""Prefixes for transformers models, at the attention-function registry every attention module calls
(``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``, after the
projections, rotary embeddings and the cache update: the cache holds real tokens, the prefix enters once per step).

While adapters of this kind exist, the registry (transformers' ``AttentionInterface``) holds local overrides, set
and deleted through its documented mapping interface, for every implementation it knows and for ``"eager"`` (not a
registry entry: its override calls the eager function the calling module's ``forward`` passes as the default).
Each override calls what the model asked for, with the prefix prepended when the calling module holds an enabled
adapter. ``unload`` of the last adapter deletes them: transformers is as it was. The garbage collector never changes
the registry (it may run in the middle of transformers' code or a ``torch.compile`` trace that reads it).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from lightning_peft.prefix.attention.base import PrefixAttention, causal_bias, loaded_names, pad_columns
from lightning_peft.record import find_record, record

_NAME = "ALL_ATTENTION_FUNCTIONS"
_EAGER = "eager"
#: ``id`` of every adapter alive and wrapping its module; the registry holds our overrides while this is not empty.
_LIVE: set[int] = set()
#: Implementation name -> (our override, the local entry it replaced or None).
_OVERRIDES: dict[str, tuple[Callable[..., Any], Callable[..., Any] | None]] = {}


def _registry() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


class TransformersPrefixAttention(PrefixAttention):
    """A transformers attention module with a prefix; its own ``forward`` runs unchanged."""


    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base, *args, **kwargs)
        record(base).prefix_adapter = self  # back-reference from the attention module to its adapter
        _LIVE.add(id(self))
        weakref.finalize(self, _LIVE.discard, id(self))  # dropped without unload: the next release forgets it
        _install()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        record(self.base_layer).prefix_adapter = self  # again: unwrap() drops it, and named adapters re-wrap the base
        _LIVE.add(id(self))
        if not _OVERRIDES:  # released when every adapter was unwrapped (named adapters re-wrap the base)
            _install()
        return self.base_layer(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        base = super().unwrap()
        record(base).prefix_adapter = None
        _release(id(self))
        return base


def _install() -> None:
    """Put an override in the registry for each implementation it knows and for eager."""
    registry = _registry()
    for name in [*registry.keys(), _EAGER]:
        if name not in _OVERRIDES:
            local = registry._local_mapping.get(name)  # (read only) a user's own local entry, put back on release
            registry[name] = override = _override(name)
            _OVERRIDES[name] = (override, local)


def _release(adapter: int) -> None:
    """Forget one adapter (by ``id``); delete the overrides once none is left."""
    _LIVE.discard(adapter)
    if _LIVE or not _OVERRIDES:
        return
    registry = _registry()
    for name, (override, local) in list(_OVERRIDES.items()):
        if registry._local_mapping.get(name) is override:
            del registry[name]
            if local is not None:
                registry[name] = local
        del _OVERRIDES[name]


def _override(name: str) -> Callable[..., Any]:
    inner = None if name == _EAGER else _registry()[name]

    def prefixed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _prefixed_call(inner or _eager_function(module), name, module, *args, **kwargs)

    return prefixed


def _eager_function(module: nn.Module) -> Callable[..., Any]:
    """The eager attention function ``module``'s forward passes to ``get_interface`` as its default."""
    forward = inspect.unwrap(type(module).forward)
    names = [n for n in loaded_names(forward) if n.endswith("eager_attention_forward")]
    function = forward.__globals__.get(names[0]) if len(names) == 1 else None
    if not callable(function):
        raise ValueError(
            f"{type(module).__name__} asked transformers for eager attention, but its forward names "
            f"{len(names)} eager attention functions ({', '.join(names) or 'none'}), so lightning_peft cannot tell "
            "which one it uses. Load the model with attn_implementation='sdpa'."
        )
    return cast("Callable[..., Any]", function)


def calls_attention_interface(module: nn.Module) -> bool:
    """Whether ``module.forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    return _NAME in loaded_names(type(module).forward) and hasattr(module, "config")  # through decorators


def _prefixed_call(inner: Callable[..., Any], implementation: str, module: nn.Module, query: torch.Tensor,
                   key: torch.Tensor, value: torch.Tensor, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
    found = find_record(module)
    adapter = cast("PrefixAttention | None", found.prefix_adapter if found is not None else None)
    if adapter is None or not adapter.enabled:
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    adapter.check_keys(key, value)
    if adapter.gated:
        out, weights = inner(module, query, key, value, attention_mask, *args, **kwargs)
        prefix_kwargs = {**kwargs, "is_causal": False} | ({"position_bias": None} if "position_bias" in kwargs else {})
        extra, _ = inner(module, query, *adapter.prefix_like(key, value), None, *args, **prefix_kwargs)
        return out + adapter.gate_value(out) * extra, weights
    p, q_len, kv_len = adapter.num_tokens, query.shape[-2], key.shape[-2]
    mask = _extend_mask(attention_mask, p, implementation, module, kwargs, query, q_len, kv_len)
    if kwargs.get("position_bias") is not None:  # T5: relative position bias, none for the prefix columns
        kwargs["position_bias"] = pad_columns(kwargs["position_bias"], p)
    return inner(module, query, *adapter.prepend(key, value), mask, *args, **kwargs)


def _extend_mask(mask: Any, p: int, implementation: str, module: nn.Module, kwargs: dict[str, Any],
                 query: torch.Tensor, q_len: int, kv_len: int) -> Any:
    """The mask with ``p`` visible columns in front; without a mask, a causal module's mask spelled out bottom-right
    (the queries are the last ``q_len`` of ``kv_len`` keys, as with a cache; ``is_causal`` would align it top-left)."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (mask.dim() == 2 or mask.shape[-1] == kv_len):
            tensor = isinstance(mask, torch.Tensor)
            got = f"of shape {tuple(mask.shape)}" if tensor else f"of type {type(mask).__name__}"
            raise ValueError(
                f"prefix tuning cannot extend the attention mask {got} that attn_implementation={implementation!r} "
                f"gives {type(module).__name__} for {kv_len} keys: it extends tensors of shape (batch, keys) or "
                "(..., keys). Use attn_implementation='sdpa' or 'eager'."
            )
        return pad_columns(mask, p)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if not causal or implementation.startswith("flash") or q_len == 1:
        return None  # flash aligns causal masks bottom-right itself: the prefix columns stay visible without a mask
    return pad_columns(causal_bias(q_len, kv_len, query)[None, None], p)

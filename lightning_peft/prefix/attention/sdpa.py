"""Prefixes for any attention module whose ``forward`` calls ``F.scaled_dot_product_attention`` (SDPA).

The adapter runs the module's *own* forward; only while it runs, a ``TorchFunctionMode`` rewrites its SDPA calls:
keys and values ``(b, h_kv, s, d)`` become ``[P_k; k]``, ``[P_v; v]`` ``(b, h_kv, p + s, d)``; a mask (bool or
additive, any broadcast shape) gets ``p`` visible columns in front; ``is_causal=True`` becomes an explicit mask (SDPA's
top-left causal mask over the real keys, prefix visible); ``scale``, ``dropout_p`` and ``enable_gqa`` pass on. Keys
repeated to the query heads (``repeat_kv``), heads folded into the batch (``(b·h, L, d)``, timm's SAM) and heads
before a windows axis (``(b, h, windows, L, d)``: every window sees the prefix) are recognised; where the shapes
cannot tell (-3 and -4 both fit), the adapter class says (:class:`HieraPrefixAttention`). A call that does not have
the layer's heads and widths passes through unchanged; a forward in which no call took the prefix raises.

A module is such a layer when its class's ``forward`` reaches ``scaled_dot_product_attention`` (:func:`calls_sdpa`:
by name or alias, through ``super().forward``, a method or a helper function). The prefix's shape must exist at
inject, before the optimizer and the distributed wrappers see the parameters, without running the model: it is
read from the module's attributes (:func:`~.base.read_shape`), and every call checks the shapes SDPA receives.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_peft.adapter import Adapter
from lightning_peft.errors import ParticipationError
from lightning_peft.prefix.attention.base import (
    HEAD_ATTRIBUTES,
    WIDTH_ATTRIBUTES,
    AttentionClass,
    PrefixAttention,
    PrefixShape,
    int_attribute,
    loaded_names,
    pad_columns,
    prefix_undefined,
    read_shape,
)

_SDPA = F.scaled_dot_product_attention
_SDPA_NAME = "scaled_dot_product_attention"
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def calls_sdpa(cls: type) -> bool:
    """Whether ``cls.forward`` reaches ``F.scaled_dot_product_attention``: named or aliased in its code, in a base
    class's forward it calls through ``super()``, or in a method of ``cls`` or a function outside torch it calls
    (two calls deep)."""
    for klass in (k for k in cls.__mro__ if "forward" in vars(k)):
        forward = vars(klass)["forward"]
        if _reaches_sdpa(cls, forward, depth=2):
            return True
        if "super" not in loaded_names(forward):
            return False
    return False


def _reaches_sdpa(cls: type, function: Any, depth: int) -> bool:
    names = loaded_names(function)
    scope = getattr(inspect.unwrap(getattr(function, "__func__", function)), "__globals__", {})
    for name in names - {"forward"}:
        target = inspect.getattr_static(cls, name, None) or scope.get(name)
        if name == _SDPA_NAME or target is _SDPA:
            return True
        inner = getattr(target, "__func__", target)  # staticmethod, classmethod
        module = str(getattr(inner, "__module__", ""))
        if depth and inspect.isfunction(inner) and not (module == "torch" or module.startswith("torch.")):
            if _reaches_sdpa(cls, inner, depth - 1):
                return True
    return False


def _candidate(module: nn.Module) -> bool:
    held = any(value is _SDPA for value in vars(module).values())  # self.attend = F.scaled_dot_product_attention
    return not isinstance(module, Adapter) and (held or calls_sdpa(type(module))) and prefix_undefined(module) is None


def _explicit_path(module: nn.Module) -> bool:
    """timm's switch: with ``fused_attn`` False the forward computes scores by hand, not with SDPA."""
    return getattr(module, "fused_attn", True) is False


def sdpa_shape(module: nn.Module) -> PrefixShape | None:
    """The prefix shape of a module whose forward calls SDPA, or ``None`` (not such a module, shape unreadable)."""
    if not _candidate(module) or _explicit_path(module):
        return None
    return read_shape(module)


def sdpa_shape_hint(modules: Iterable[nn.Module]) -> str:
    """Sentences for the refusal naming modules that call SDPA but are not adapted, and the fix ('' if none)."""
    found = [m for m in modules if _candidate(m)]
    unreadable = sorted({type(m).__qualname__ for m in found if read_shape(m) is None})
    explicit = sorted({type(m).__qualname__ for m in found if _explicit_path(m) and read_shape(m) is not None})
    hint = ""
    if unreadable:
        hint += (f" {', '.join(unreadable[:4])} call(s) F.scaled_dot_product_attention: to adapt them, set the "
                 f"attributes {' or '.join(HEAD_ATTRIBUTES)} and head_dim (or {' or '.join(WIDTH_ATTRIBUTES)}), "
                 "plus num_kv_heads for grouped-query attention.")
    if explicit:
        hint += (f" {', '.join(explicit[:4])} call(s) F.scaled_dot_product_attention only when fused_attn is True "
                 "(it is False): set fused_attn = True on them to adapt them.")
    return hint


def _split_heads(call: dict[str, Any], heads: int | None) -> dict[str, Any] | None:
    """A call on ``(b·h, L, d)`` tensors (heads folded into the batch, as timm's SAM) on ``(b, h, L, d)`` views."""
    q, k, v = call["query"], call["key"], call["value"]
    if heads is None or q.shape[0] % heads or k.dim() != 3 or not q.shape[0] == k.shape[0] == v.shape[0]:
        return None
    mask = call.get("attn_mask")
    if mask is not None and mask.dim() == 3 and mask.shape[0] == q.shape[0]:
        mask = mask.unflatten(0, (-1, heads))
    return {**call, "query": q.unflatten(0, (-1, heads)), "key": k.unflatten(0, (-1, heads)),
            "value": v.unflatten(0, (-1, heads)), "attn_mask": mask}


class SdpaPrefixAttention(PrefixAttention):
    """Any attention module that calls ``F.scaled_dot_product_attention``, with a prefix; its forward runs unchanged
    and takes the module's arguments (see the module docstring for what its SDPA calls get).

    Raises:
        ParticipationError: The forward called no SDPA (timm's ``fused_attn = False``): the prefix would be left out.
        ValueError: No SDPA call had keys this layer's prefix fits (its head attributes do not describe them).
    """

    #: The heads' axis in this family's SDPA calls of 5 or more dimensions (``None``: -3 or -4, whichever alone fits).
    layout_heads_axis: ClassVar[int | None] = None

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base, *args, **kwargs)
        self.query_heads = int_attribute([base], HEAD_ATTRIBUTES)  # None: a user's handler gave the shape alone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        with _PrefixSdpa(self) as mode:
            out = self.base_layer(*args, **kwargs)
        if mode.fit:
            return out
        name, s = type(self.base_layer).__name__, self.shape
        if not mode.unfit:
            fix = ("set fused_attn = True on it" if _explicit_path(self.base_layer) else "load the model with "
                   "attn_implementation='sdpa'" if hasattr(self.base_layer, "config") else "call it")
            raise ParticipationError(
                f"{name} ran without calling F.scaled_dot_product_attention, where its prefix enters, so the prefix "
                f"was left out. To train the prefix, {fix}, or teach prefix tuning its attention with "
                "lightning_peft.register_attention_handler."
            )
        queries, keys = mode.unfit[0]
        raise ValueError(
            f"{name} called F.scaled_dot_product_attention with queries {queries} and keys {keys}, but its prefix "
            f"was built for {self.query_heads or 'any'} query heads, {s.kv_heads} key/value heads of width "
            f"{s.key_dim} (read from its attributes), heads on axis -3 (or -4 before windows). Set num_heads, "
            "num_kv_heads and head_dim to what it attends with and inject again, or register a handler."
        )

    def heads_axis(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int | None:
        """The axis of an SDPA call's heads if the call is this layer's, else ``None``: keys and values of the
        prefix's widths, and on axis -3 (``(b, h, s, d)``) or -4 (``(b, h, windows, s, d)``) the layer's query heads
        on the queries and its key/value heads (or the query heads: repeated) on the keys.

        Raises:
            ValueError: Both axes fit, so which one holds the heads cannot be told from the shapes.
        """
        s, heads = self.shape, self.query_heads
        if not (key.dim() >= 4 and value.dim() == key.dim() and key.shape[-1] == s.key_dim
                and value.shape[-1] == s.value_dim and key.shape[:-2] == value.shape[:-2]):
            return None
        if heads is None:  # a user's handler gave the shape alone: SDPA's layout
            return -3 if key.shape[-3] % s.kv_heads == 0 else None
        candidates = (-3,) if key.dim() == 4 else (self.layout_heads_axis,) if self.layout_heads_axis else (-3, -4)
        axes = [axis for axis in candidates if query.shape[axis] == heads and key.shape[axis] in (s.kv_heads, heads)]
        if len(axes) > 1:
            raise ValueError(
                f"{type(self.base_layer).__name__} called F.scaled_dot_product_attention with keys "
                f"{tuple(key.shape)}: axes -3 and -4 both have its {heads} heads, so which one holds them cannot be "
                "told. Register a handler whose adapter subclasses SdpaPrefixAttention and sets layout_heads_axis "
                "(as HieraPrefixAttention)."
            )
        return axes[0] if axes else None

    def prefixed_sdpa(self, call: dict[str, Any], heads_axis: int) -> torch.Tensor:
        """The SDPA call ``call`` (its arguments by name) over ``[prefix; keys]``: one softmax over both."""
        q, k, v = call["query"], call["key"], call["value"]
        mask = call.get("attn_mask")
        if mask is not None:  # (..., L|1, S|1) -> (..., L|1, p + S), prefix columns visible
            mask = pad_columns(mask.expand(*mask.shape[:-1], k.shape[-2]), self.num_tokens)
        elif call.get("is_causal"):  # SDPA's causal mask (top-left aligned) over the real keys only
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            mask, call = pad_columns(causal, self.num_tokens), {**call, "is_causal": False}
        keys, values = self.prepend(k, v, heads_axis)
        return _SDPA(**{**call, "key": keys, "value": values, "attn_mask": mask})

    def gated_branch(self, call: dict[str, Any], heads_axis: int) -> torch.Tensor:
        """``tanh(g)`` times the call's queries attending over the prefix alone (added to the unchanged call)."""
        pk, pv = self.prefix_like(call["key"], call["value"], heads_axis)
        extra = _SDPA(**{**call, "key": pk, "value": pv, "attn_mask": None, "is_causal": False})
        return self.gate_value(extra) * extra


class HieraPrefixAttention(SdpaPrefixAttention):
    """timm Hiera's ``MaskUnitAttention``: SDPA on ``(b, heads, mask units, tokens, d)``, where heads and mask units
    can be equal in number; each mask unit sees the layer's prefix."""

    layout_heads_axis = -4


#: SDPA families whose call layout the shapes cannot tell apart.
SDPA_LAYOUT_CLASSES: tuple[AttentionClass, ...] = (
    AttentionClass("timm.models.hiera", "MaskUnitAttention", HieraPrefixAttention),
)


class _PrefixSdpa(TorchFunctionMode):
    """Entered only during one adapted module's forward: rewrites its SDPA calls that fit the adapter."""

    def __init__(self, adapter: SdpaPrefixAttention) -> None:
        super().__init__()
        self.adapter = adapter
        self.fit = False
        self.unfit: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (query shape, key shape) of calls passed on

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        call = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
        merged = call["query"].dim() == 3  # (b·h, L, d): attend on (b, h, L, d) views, fold the heads back after
        split = _split_heads(call, self.adapter.query_heads) if merged else call
        axis = None if split is None else self.adapter.heads_axis(split["query"], split["key"], split["value"])
        if split is None or axis is None:
            self.unfit.append((tuple(call["query"].shape), tuple(call["key"].shape)))
            return func(*args, **kwargs)
        self.fit = True
        if self.adapter.gated:  # the call as the module made it, plus the gated prefix branch (exact start)
            extra = self.adapter.gated_branch(split, axis)
            return func(*args, **kwargs) + (extra.flatten(0, 1) if merged else extra)
        out = self.adapter.prefixed_sdpa(split, axis)
        return out.flatten(0, 1) if merged else out

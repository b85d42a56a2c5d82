"""Prefixes for any attention module whose ``forward`` calls ``F.scaled_dot_product_attention`` (SDPA).

The adapter runs the module's *own* forward and, only while that forward runs, a ``TorchFunctionMode`` rewrites
its SDPA call(s): the layer's prefix is prepended to the keys and values it passes, per key/value head::

    module.forward(x) ──► ... ──► F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale, ...)
                                      ▼  (intercepted)
          q: (b, h, n, d)    k, v: (b, h_kv, s, d) ──► [P_k; k], [P_v; v]: (b, h_kv, p + s, d)
          attn_mask (bool / additive, any broadcastable shape) ──► p always-visible columns in front (True / 0.0)
          is_causal=True ──► an explicit mask: prefix visible, SDPA's own top-left causal mask over the real keys

``scale``, ``dropout_p`` and ``enable_gqa`` are passed on as given. With grouped-query attention the prefix has
``h_kv`` heads; a module that repeats its keys to ``h`` heads before SDPA (``repeat_interleave``, as transformers'
``repeat_kv``) gets its prefix repeated the same way; so does one that folds its heads into the batch,
``(b·h, n, d)`` batch-major as ``reshape(b * h, ...)`` gives (timm's SAM). Heads may also sit on axis -4 before a
windows axis, ``(b, h, windows, n, d)``: each window sees the layer's prefix (where -3 and -4 both fit, the
adapter class says which: :class:`HieraPrefixAttention`). An SDPA call whose queries and keys do not have the
layer's heads and head width is not this layer's attention and passes through unchanged; a forward in which no
call took the prefix raises, and so does one with no SDPA call at all.

**Which modules.** A module is an attention layer for this handler when the code of its class's ``forward`` (or of
a method of the same class that ``forward`` names) calls ``scaled_dot_product_attention``. The prefix's shape must
be known at inject, before the optimizer exists (so the optimizer and the distributed wrappers see the prefix
tensors), without running the model: it is read from the module's attributes, as :func:`~.base.read_shape` does
(``num_heads``, ``head_dim``, ...); every call checks the shapes SDPA receives against it. A module calling SDPA
whose heads or width cannot be read stays unhandled; the refusal names the attributes to set (or use
:func:`~lightning_peft.prefix.attention.register_attention_handler`). So does one whose ``fused_attn`` is False
(timm's switch to its explicit path). Handlers of known families (transformers, timm, torchvision,
``nn.MultiheadAttention``) are asked first.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from types import CodeType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_peft.adapter import Adapter
from lightning_peft.errors import ParticipationError
from lightning_peft.prefix.attention.base import (
    HEAD_ATTRIBUTES,
    HEAD_DIM_ATTRIBUTES,
    KV_HEAD_ATTRIBUTES,
    WIDTH_ATTRIBUTES,
    AttentionClass,
    PrefixAttention,
    PrefixShape,
    int_attribute,
    pad_columns,
    prefix_undefined,
    read_shape,
)

_SDPA = F.scaled_dot_product_attention
_SDPA_NAME = "scaled_dot_product_attention"
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

def _names(code: CodeType) -> set[str]:
    """Names a code object and the functions defined inside it load (globals and attributes)."""
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            found |= _names(const)
    return found


def _code(function: Any) -> CodeType | None:
    if isinstance(function, (staticmethod, classmethod)):
        function = function.__func__
    return getattr(inspect.unwrap(function), "__code__", None) if callable(function) else None


def calls_sdpa(cls: type) -> bool:
    """Whether ``cls.forward``, or a method of ``cls`` it names, calls ``scaled_dot_product_attention``."""
    code = _code(inspect.getattr_static(cls, "forward", None))
    if code is None:
        return False
    names = _names(code)
    if _SDPA_NAME in names:
        return True
    helpers = (_code(inspect.getattr_static(cls, name, None)) for name in names if name != "forward")
    return any(helper is not None and _SDPA_NAME in _names(helper) for helper in helpers)


def _candidate(module: nn.Module) -> bool:
    return not isinstance(module, Adapter) and calls_sdpa(type(module)) and prefix_undefined(module) is None


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
        hint += (f" {', '.join(unreadable[:4])} call(s) F.scaled_dot_product_attention: prefix tuning adapts such a "
                 f"module once it can read its heads and head width, so set the attributes {HEAD_ATTRIBUTES[0]} (or "
                 f"{', '.join(HEAD_ATTRIBUTES[1:])}) and {HEAD_DIM_ATTRIBUTES[0]} (or {', '.join(WIDTH_ATTRIBUTES)}, "
                 f"divided by the heads), plus {KV_HEAD_ATTRIBUTES[0]} for grouped-query attention.")
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
    """Any attention module that calls ``F.scaled_dot_product_attention``, with a prefix; its forward runs unchanged.

    The forward takes whatever the module's forward takes. See the module docstring for what the SDPA call gets.

    Raises:
        ValueError: The module's forward called SDPA, but no call had keys this layer's prefix fits (the head
            attributes the shape was read from do not describe the keys it attends over).
    """

    family = "scaled_dot_product_attention"
    #: The axis of the heads in this family's SDPA calls of 5 or more dimensions, where the shapes alone cannot tell
    #: (``None``: -3 or -4, whichever alone fits).
    layout_heads_axis: ClassVar[int | None] = None

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base, *args, **kwargs)
        self.query_heads = int_attribute([base], HEAD_ATTRIBUTES)  # None: a user's handler gave the shape alone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        mode = _PrefixSdpa(self)
        with mode:
            out = self.base_layer(*args, **kwargs)
        if not mode.fit and not mode.unfit:  # no SDPA call at all (timm's fused_attn=False): the prefix was left out
            fix = "set fused_attn = True on it" if _explicit_path(self.base_layer) else "call it"
            raise ParticipationError(
                f"{type(self.base_layer).__name__} ran without calling F.scaled_dot_product_attention, where its "
                f"prefix enters, so the prefix was left out. To train the prefix, {fix}, or teach prefix tuning "
                "its attention with lightning_peft.register_attention_handler."
            )
        if not mode.fit:  # SDPA ran, none of its calls took the prefix: it would be silently left out
            (queries, keys), s = mode.unfit[0], self.shape
            raise ValueError(
                f"{type(self.base_layer).__name__} called F.scaled_dot_product_attention with queries {queries} and "
                f"keys {keys}, but its prefix was built for {self.query_heads or 'any'} query heads, {s.kv_heads} "
                f"key/value heads of width {s.key_dim} (read from its attributes at inject), heads on axis -3 as in "
                f"SDPA's (batch, heads, length, width) or -4 before windows. Set {HEAD_ATTRIBUTES[0]}, "
                f"{KV_HEAD_ATTRIBUTES[0]} and {HEAD_DIM_ATTRIBUTES[0]} to what it attends with and inject again, or "
                "teach it with lightning_peft.register_attention_handler."
            )
        return out

    def heads_axis(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int | None:
        """The axis of an SDPA call's heads if the call is this layer's, else ``None``.

        The call is this layer's when its keys and values have the prefix's widths and, on axis -3 (SDPA's
        ``(b, h, s, d)``) or -4 (``(b, h, windows, s, d)``, as timm's Hiera), the layer's query heads on the
        queries and its key/value heads (or the query heads: repeated) on the keys.

        Raises:
            ValueError: Both axes fit, so which one holds the heads cannot be told from the shapes.
        """
        s, heads = self.shape, self.query_heads
        if not (key.dim() >= 4 and value.dim() == key.dim() and key.shape[-1] == s.key_dim
                and value.shape[-1] == s.value_dim and key.shape[:-2] == value.shape[:-2]):
            return None
        if heads is None:  # a user's handler gave the shape alone: SDPA's layout
            return -3 if key.shape[-3] % s.kv_heads == 0 else None
        if key.dim() == 4:  # SDPA's (b, h, s, d); -4 is the batch
            candidates: tuple[int, ...] = (-3,)
        else:
            candidates = (self.layout_heads_axis,) if self.layout_heads_axis else (-3, -4)
        axes = [axis for axis in candidates
                if query.shape[axis] == heads and key.shape[axis] in (s.kv_heads, heads)]
        if len(axes) > 1:
            raise ValueError(
                f"{type(self.base_layer).__name__} called F.scaled_dot_product_attention with keys "
                f"{tuple(key.shape)}: axes -3 and -4 both have its {heads} heads, so which one holds them cannot be "
                "told. Teach it with lightning_peft.register_attention_handler: a handler whose adapter subclasses "
                "SdpaPrefixAttention and sets layout_heads_axis (as HieraPrefixAttention)."
            )
        return axes[0] if axes else None

    def prefixed_sdpa(self, call: dict[str, Any], heads_axis: int) -> torch.Tensor:
        """The SDPA call ``call`` (its arguments by name) over ``[prefix; keys]``: one softmax over both."""
        q, k, v = call["query"], call["key"], call["value"]
        p, q_len, kv_len = self.num_tokens, q.shape[-2], k.shape[-2]
        mask = call.get("attn_mask")
        if mask is not None:  # (..., L|1, S|1) -> (..., L|1, p + S), prefix columns visible
            mask = pad_columns(mask.expand(*mask.shape[:-1], kv_len), p)
        elif call.get("is_causal"):  # SDPA's causal mask (top-left aligned) over the real keys only
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
            mask, call = pad_columns(causal, p), {**call, "is_causal": False}
        keys, values = self.prepend(k, v, heads_axis)
        return _SDPA(**{**call, "key": keys, "value": values, "attn_mask": mask})

    def gated_branch(self, call: dict[str, Any], heads_axis: int) -> torch.Tensor:
        """``tanh(g)`` times the call's queries attending over the prefix alone (added to the unchanged call)."""
        pk, pv = self.prefix_like(call["key"], call["value"], heads_axis)
        extra = _SDPA(**{**call, "key": pk, "value": pv, "attn_mask": None, "is_causal": False})
        return self.gate_value(extra) * extra


class HieraPrefixAttention(SdpaPrefixAttention):
    """timm Hiera's ``MaskUnitAttention``: SDPA on ``(b, heads, mask units, tokens, d)``; heads and mask units can
    be equal in number, so the layout is said here (each mask unit sees the layer's prefix, as Swin's windows)."""

    family = "timm Hiera MaskUnitAttention"
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

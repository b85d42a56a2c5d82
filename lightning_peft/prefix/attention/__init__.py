"""Attention families prefix tuning knows, as a registry of handlers users can extend.

A handler looks at one module and returns an :class:`AttentionMatch` (the adapter class and the prefix shape)
or ``None``. Handlers are asked in order, newest registered first, and the first non-``None`` answer wins:

>>> from torch import nn
>>> match_attention(nn.MultiheadAttention(8, 2)).shape
PrefixShape(kv_heads=2, key_dim=4, value_dim=4)
>>> match_attention(nn.Linear(4, 4)) is None
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_peft.imported import imported_class
from lightning_peft.prefix.attention.base import AttentionClass, PrefixAttention, PrefixShape, attribute_shape
from lightning_peft.prefix.attention.inline_transformers import INLINE_CLASSES
from lightning_peft.prefix.attention.multihead import MultiheadPrefixAttention
from lightning_peft.prefix.attention.sdpa import SDPA_LAYOUT_CLASSES, SdpaPrefixAttention, sdpa_shape
from lightning_peft.prefix.attention.timm_biased import TIMM_BIASED_CLASSES
from lightning_peft.prefix.attention.transformers_attention import (
    TransformersPrefixAttention,
    calls_attention_interface,
)
from lightning_peft.prefix.attention.window_attention import WINDOW_CLASSES


@dataclass(frozen=True)
class AttentionMatch:
    """A handler's answer: which adapter wraps the module, and the shape of its prefix."""

    adapter: type[PrefixAttention]
    shape: PrefixShape


AttentionHandler = Callable[[nn.Module], "AttentionMatch | None"]


def class_table_handler(table: tuple[AttentionClass, ...]) -> AttentionHandler:
    """A handler matching the classes of ``table`` (of libraries already imported) to their adapters and shapes."""

    def handler(module: nn.Module) -> AttentionMatch | None:
        for entry in table:
            cls = imported_class(entry.module, entry.name)
            if cls is not None and (type(module) is cls or (entry.subclasses and isinstance(module, cls))):
                return AttentionMatch(entry.adapter, attribute_shape(module))
        return None

    return handler


def _transformers_handler(module: nn.Module) -> AttentionMatch | None:
    if not calls_attention_interface(module):
        return None
    return AttentionMatch(TransformersPrefixAttention, attribute_shape(module))


def _multihead_handler(module: nn.Module) -> AttentionMatch | None:
    if not isinstance(module, nn.MultiheadAttention):
        return None
    return AttentionMatch(MultiheadPrefixAttention, attribute_shape(module))


def _sdpa_handler(module: nn.Module) -> AttentionMatch | None:
    shape = sdpa_shape(module)
    return AttentionMatch(SdpaPrefixAttention, shape) if shape is not None else None


_HANDLERS: list[AttentionHandler] = [
    _transformers_handler,  # every module calling transformers' ALL_ATTENTION_FUNCTIONS
    _multihead_handler,  # nn.MultiheadAttention and subclasses
    # attention computed by hand: BLOOM, DeBERTa-v2; Swin (torchvision; timm v1, v2) and torchvision MaxViT; timm
    # LeViT, EfficientFormer (per-position bias tables); and timm Hiera (SDPA, but heads before its mask units)
    class_table_handler(INLINE_CLASSES + WINDOW_CLASSES + TIMM_BIASED_CLASSES + SDPA_LAYOUT_CLASSES),
    _sdpa_handler,  # last: any other module whose forward calls F.scaled_dot_product_attention (sdpa.py)
]


def register_attention_handler(handler: AttentionHandler) -> AttentionHandler:
    """Teach prefix tuning a new attention class; asked before the built-in handlers (first match wins).

    Args:
        handler: ``module -> AttentionMatch | None``; return a match for modules you handle, ``None`` otherwise.
            The adapter class subclasses :class:`PrefixAttention` and joins its keys and values with
            ``self.prepend(key, value)``.

    Returns:
        ``handler``, so this also works as a decorator.
    """
    _HANDLERS.insert(0, handler)
    return handler


def match_attention(module: nn.Module) -> AttentionMatch | None:
    """The first handler's answer for ``module``, or ``None`` if no handler knows it."""
    for handler in _HANDLERS:
        match = handler(module)
        if match is not None:
            return match
    return None


__all__ = [
    "AttentionClass",
    "AttentionHandler",
    "AttentionMatch",
    "MultiheadPrefixAttention",
    "PrefixAttention",
    "PrefixShape",
    "SdpaPrefixAttention",
    "class_table_handler",
    "match_attention",
    "register_attention_handler",
]

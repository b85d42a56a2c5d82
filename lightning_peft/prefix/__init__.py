"""Prefix tuning (Li & Liang 2021): the method's configuration and, in :mod:`~lightning_peft.prefix.attention`,
one prefix adapter per attention family, found by a registry of handlers users can extend.

* :mod:`~lightning_peft.prefix.config`: :class:`PrefixTuningConfig` (the callback ``PrefixTuning`` takes the same
  arguments), the selection of attention modules, and :func:`fold_prefix`;
* :mod:`~lightning_peft.prefix.attention`: the adapters (transformers attention interface, ``nn.MultiheadAttention``,
  timm ``Attention``, Swin window attention) and :func:`register_attention_handler`.
"""

from lightning_peft.prefix.attention import (
    AttentionHandler,
    AttentionMatch,
    PrefixAttention,
    PrefixShape,
    match_attention,
    register_attention_handler,
)
from lightning_peft.prefix.config import PrefixTuningConfig, find_attention, fold_prefix

__all__ = [
    "AttentionHandler",
    "AttentionMatch",
    "PrefixAttention",
    "PrefixShape",
    "PrefixTuningConfig",
    "find_attention",
    "fold_prefix",
    "match_attention",
    "register_attention_handler",
]

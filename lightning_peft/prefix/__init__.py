"""Prefix tuning (Li & Liang 2021): :class:`PrefixTuningConfig` and :func:`fold_prefix` in
:mod:`~lightning_peft.prefix.config`; the adapters, one per attention family, and their registry in
:mod:`~lightning_peft.prefix.attention`.
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

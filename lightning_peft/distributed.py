"""Helpers for sharded training: an FSDP1 wrap policy that keeps trainable and frozen tensors apart.

FSDP1 flattens every wrap unit into one tensor, so a unit must be uniformly trainable or frozen (and of one
dtype); a unit that mixes them also keeps gradient memory for its frozen weights. With
:func:`fsdp_auto_wrap_policy` every adapter, every layer an adapter wraps and every ``trainable_modules`` module
is its own unit, next to the transformer blocks you name. (FSDP2 ``fully_shard`` accepts mixed units.)
Token prompts are the exception: the prompt is read by hooks on the whole model, outside the adapter's own
forward, so it stays in the root unit next to frozen embeddings: use ``FSDPStrategy(use_orig_params=True)``.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.core import _SAVED_TENSORS, Adapter


def fsdp_auto_wrap_policy(*layer_classes: type[nn.Module]) -> object:
    """An FSDP1 ``auto_wrap_policy`` that wraps ``layer_classes`` and puts adapter tensors in units of their own.

    Args:
        layer_classes: Block classes to shard as units, e.g. ``LlamaDecoderLayer``.

    Returns:
        A ``torch.distributed.fsdp.wrap.CustomPolicy`` for ``FSDPStrategy(auto_wrap_policy=...)``.

    Example::

        strategy = FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(LlamaDecoderLayer))
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    def is_unit(module: nn.Module) -> bool:
        if isinstance(module, Adapter):
            return module.fsdp_unit
        if isinstance(module, layer_classes):
            return True
        if module.__dict__.get("_peft_is_base", False):  # the frozen layer inside an adapter
            return True
        marked: frozenset[str] = getattr(module, _SAVED_TENSORS, frozenset())
        return any(name in marked for name, _ in module.named_parameters(recurse=False))

    return CustomPolicy(is_unit)

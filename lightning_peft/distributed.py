"""Helpers for sharded training: an FSDP1 wrap policy that keeps trainable and frozen tensors apart, and a mend
for the frozen units FSDP1 leaves unregistered after a backward on one device (:func:`restore_fsdp1_parameters`).

FSDP1 flattens every wrap unit into one tensor, so a unit must be uniformly trainable or frozen (and of one
dtype); a unit that mixes them also keeps gradient memory for its frozen weights. With
:func:`fsdp_auto_wrap_policy` every adapter, every layer an adapter wraps and every ``trainable_modules`` module
is its own unit, next to the transformer blocks you name. (FSDP2 ``fully_shard`` accepts mixed units.)
Token prompts are the exception: the prompt is read by hooks on the whole model, outside the adapter's own
forward, so it stays in the root unit next to frozen embeddings: use ``FSDPStrategy(use_orig_params=True)``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import Adapter
from lightning_peft.errors import PEFTWarning
from lightning_peft.record import find_record
from lightning_peft.tensors import marked


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
        if getattr(find_record(module), "wrapped_base", False):  # the frozen layer inside an adapter
            return True
        return any(name in marked(module) for name, _ in module.named_parameters(recurse=False))

    return CustomPolicy(is_unit)


def restore_fsdp1_parameters(model: nn.Module) -> int:
    """Register again the parameters FSDP1 left as plain tensors in frozen ``NO_SHARD`` units; returns how many
    units it mended.

    With ``NO_SHARD`` (also what FSDP1 switches to on one device) and ``use_orig_params=True``, a unit whose
    parameters are all frozen but whose output needs a gradient is unsharded for the backward and never
    resharded: torch's catch-all reshard takes the unsharded flat parameter, which shares the shard's memory,
    for an already resharded one. Its modules then hold their weights as plain tensors, so ``state_dict()``
    (full or sharded) fails with "FSDP assumes <name> is in the state_dict". Adapters make such units: a block
    of frozen weights around adapter units. This does what that reshard would have done (the same views, now
    registered as parameters); units in use (inside forward, backward or ``summon_full_params``) are left alone.
    The lightning_peft callbacks and mixin call it after every backward (it returns at once without FSDP1).
    """
    if not torch.distributed.is_available():
        return 0
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if not units:
        return 0
    mended = 0
    try:  # torch internals (2.x): a torch that renames them gets a warning, not a failed training step
        from torch.distributed.fsdp._common_utils import HandleTrainingState

        for unit in units:
            handle = unit._handle
            if (handle is None or not handle._use_orig_params or handle.uses_sharded_strategy
                    or handle._training_state != HandleTrainingState.IDLE):
                continue
            infos: list[Any] = [*handle.flat_param._param_infos, *handle.flat_param._shared_param_infos]
            if any(not isinstance(getattr(info.module, info.param_name), nn.Parameter) for info in infos):
                handle._use_sharded_views()  # NO_SHARD: the unsharded views, registered as parameters
                mended += 1
    except (AttributeError, ImportError) as error:
        _warn_once(f"lightning_peft: cannot check FSDP1's frozen NO_SHARD units in this torch ({error!r}); "
                   "with one device or NO_SHARD, state dicts may miss frozen weights after a backward.")
    return mended


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, PEFTWarning, stacklevel=3)

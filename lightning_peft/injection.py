"""The one injection path every method shares.

``inject(model, method)`` asks the method to attach its adapters, marks what the user wants trained, and then
freezes everything else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import Adapter, adapters
from lightning_peft.methods import BatchNormMode, Method
from lightning_peft.record import Origin, add_peft_hook, find_record, record, remove_peft_hooks
from lightning_peft.tensors import clean_name, mark_trainable, marked, refresh_trainable


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, *methods: Method) -> nn.Module:
    """Add the adapters of ``methods`` to ``model`` in place, freeze the rest, and return ``model``.

    Args:
        model: Any ``nn.Module`` (a LightningModule too).
        methods: Method objects such as ``LoRA(r=8)``; several compose (each attaches its own adapters).

    Returns:
        ``model``, with only adapter parameters and ``trainable_modules`` left trainable.

    Raises:
        TargetNotFoundError: A method's targets or ``trainable_modules`` match nothing.

    Example:
        >>> from lightning_peft import LoRA
        >>> model = inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), LoRA(r=2, target_modules=["0"]))
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.lora_A', '0.lora_B']
    """
    for method in methods:
        if not isinstance(method, Method):
            raise TypeError(f"inject() takes method objects such as LoRA(r=8); got {type(method).__name__}.")
        existing = {id(adapter) for _, adapter in adapters(model)}
        method.attach(model)
        dtype = getattr(method, "adapter_dtype", "auto")
        position = len(applied_methods(model))
        for name, adapter in adapters(model):
            if id(adapter) in existing:
                continue
            record(adapter).origin = Origin(position, method, clean_name(name))
            if "base_layer" in adapter._modules and adapter.fsdp_unit:
                record(adapter.unwrap()).wrapped_base = True  # for fsdp_auto_wrap_policy
            if dtype != "auto":
                adapter.pin_dtype(getattr(torch, dtype))
        rules = method.trainable_rules()
        if rules:
            from lightning_peft.targets import select_names

            for name in select_names(model, rules, what="trainable_modules"):
                for sub in model.get_submodule(name).modules():
                    if not isinstance(sub, Adapter):
                        mark_trainable(sub)
        _configure_batchnorm(model, method.batchnorm)
        record(model).methods.append(method)
    refresh_trainable(model)
    return model


def _configure_batchnorm(model: nn.Module, mode: BatchNormMode) -> None:
    """Frozen BatchNorm layers keep their statistics (``"frozen"``) or update and save them (``"update"``).

    With several methods, ``"update"`` wins: a later method's default ``"frozen"`` does not stop the statistics."""
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.weight is not None and "weight" in marked(module):
            continue  # a trainable norm (trainable_modules) trains as usual
        if mode == "update":
            mark_trainable(module, {"running_mean", "running_var", "num_batches_tracked"})
            if record(module).frozen_stats:
                record(module).frozen_stats = False
                remove_peft_hooks(module)  # an earlier method froze them: its two statistics hooks go
        elif "running_mean" not in marked(module) and not record(module).frozen_stats:
            record(module).frozen_stats = True
            add_peft_hook(module, module.register_forward_pre_hook(_use_running_stats))
            add_peft_hook(module, module.register_forward_hook(_restore_mode))


def _use_running_stats(module: nn.Module, args: Any) -> None:
    record(module).was_training = module.training
    module.training = False  # normalise with running statistics and leave them unchanged


def _restore_mode(module: nn.Module, args: Any, output: Any) -> None:
    state = record(module)
    if state.was_training is not None:
        module.training, state.was_training = state.was_training, None


def applied_methods(model: nn.Module) -> list[Method]:
    """The method objects injected into ``model`` (as the root passed to :func:`inject`), in order."""
    found = find_record(model)
    return list(found.methods) if found is not None else []

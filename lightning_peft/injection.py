"""The one injection path every method shares.

``inject(model, method)`` owns the loop: it asks the method where its adapters go (``sites``), has it build one
adapter per site, puts each in place and records where it came from, lets the method finish what spans its sites,
marks what the user wants trained, and then freezes everything else (see :mod:`lightning_peft.methods`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import Adapter
from lightning_peft.errors import TargetNotFoundError
from lightning_peft.fast_paths import avoid_fused_paths
from lightning_peft.guard import install_participation_check
from lightning_peft.methods import LAYER_NAME, BatchNormMode, Method, Site, init_seed
from lightning_peft.record import Origin, add_peft_hook, find_record, record, remove_peft_hooks
from lightning_peft.targets import select_names
from lightning_peft.tensors import base_name, clean_name, mark_trainable, marked, refresh_trainable


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, *methods: Method) -> nn.Module:
    """Add the adapters of ``methods`` to ``model`` in place, freeze the rest, and return ``model``.

    For each method in turn: every site it selects is replaced by the adapter it builds (seeded from the site's
    name), the method finishes what spans its sites, its ``trainable_modules`` are marked, and BatchNorm layers
    are set up; finally only adapter tensors and marked tensors keep ``requires_grad``.

    Args:
        model: Any ``nn.Module`` (a LightningModule too).
        methods: Method objects such as ``LoRA(r=8)``; several compose (each adds its own adapters).

    Returns:
        ``model``, with only adapter parameters and ``trainable_modules`` left trainable.

    Raises:
        TargetNotFoundError: A method's targets or ``trainable_modules`` match nothing.
        ValueError: A method cannot adapt a selected module (the message names it and the fix).

    Example:
        >>> from lightning_peft import LoRA
        >>> model = inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), LoRA(r=2, target_modules=["0"]))
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.lora_A', '0.lora_B']
    """
    for method in methods:
        if not isinstance(method, Method):
            raise TypeError(f"inject() takes method objects such as LoRA(r=8); got {type(method).__name__}.")
        origin = len(applied_methods(model))
        built: list[tuple[str, Adapter]] = []
        sites = _sites(model, method)
        if not sites:  # an empty selection (target_modules=[]) would train nothing, silently
            raise TargetNotFoundError(
                f"{_label(method)} selected nothing to adapt in {type(model).__name__} (an empty target_modules, and "
                "no target_parameters?). Name the modules to adapt."
            )
        for site in sites:
            if not site.name:
                raise TypeError(f"{_label(method)} adapts modules inside a model; pass the model that holds "
                                f"this {type(site.module).__name__}.")
            adapter = _build(model, method, site)
            replace_module(model, site.name, adapter)
            _record_adapter(adapter, Origin(origin, method, clean_name(site.name)), method.adapter_dtype)
            built.append((site.name, adapter))
        method.finish(model, built)
        rules = method.trainable_rules()
        if rules:
            for name in select_names(model, rules, what="trainable_modules"):
                for sub in model.get_submodule(name).modules():
                    if not isinstance(sub, Adapter):
                        mark_trainable(sub)
        _configure_batchnorm(model, method.batchnorm)
        record(model).methods.append(method)
    refresh_trainable(model)
    avoid_fused_paths(model)
    install_participation_check(model)
    return model


def _sites(model: nn.Module, method: Method) -> list[Site[Any]]:
    """The method's sites; a model that holds the same kind of method already is named in the error, as the cause.

    Raises:
        ValueError: ``method`` was injected into ``model`` before (equal arguments), or it selects layers that an
            earlier method of its kind adapted.
    """
    kind = method.to_dict().get("method")
    earlier = [m for m in applied_methods(model) if m.to_dict().get("method") == kind]
    fix = ("Inject each method once: unload(model) first to start over, or add_adapter(model, name, config) for a "
           "second, named set of adapters.")
    if any(m.to_dict() == method.to_dict() for m in earlier):
        raise ValueError(f"{type(model).__name__} already holds {_label(method)} adapters with these arguments "
                         f"(injected earlier). {fix}")
    try:
        return list(method.sites(model))
    except TargetNotFoundError as error:
        if not earlier:
            raise
        raise type(error)(f"{type(model).__name__} already holds {_label(method)} adapters from an earlier inject, "
                          f"and this one selects layers inside them: {error} {fix}") from None


def _build(model: nn.Module, method: Method, site: Site[Any]) -> Adapter:
    """The method's adapter for ``site``; an error raised while building names the layer (the one error text)."""
    try:
        return method.build(model, site, init_seed(method.seed, base_name(site.name)))  # the same in any order
    except ValueError as error:
        message = str(error).replace(LAYER_NAME, repr(site.name))
        raise type(error)(f"{_label(method)} cannot adapt {site.name!r}: {message}") from None


def _label(method: Method) -> str:
    return str(getattr(method, "label", type(method).__name__))


def _record_adapter(adapter: Adapter, origin: Origin, dtype: str) -> None:
    record(adapter).origin = origin
    base = adapter._modules.get("base_layer")  # not unwrap(): a prefix adapter's unwrap() drops its back-reference
    if base is not None and adapter.fsdp_unit:
        record(base).wrapped_base = True  # for fsdp_auto_wrap_policy
    if dtype != "auto":
        adapter.pin_dtype(getattr(torch, dtype))


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

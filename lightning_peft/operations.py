"""Operations on adapted models: merge, unmerge, unload, switch adapters off, count parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import adapters
from lightning_peft.injection import replace_module
from lightning_peft.record import add_peft_hook, forget_injection
from lightning_peft.zero3 import global_shape, is_partitioned


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter (LoRA) into its base weights, in place; returns ``model``.

    Adapters that change activations rather than weights (prompts, prefixes) stay active.

    Raises:
        TypeError: A LoRA layer's weight cannot take its update exactly (a layer whose own forward transforms the
            weight, as timm's ``ScaledStdConv2d``; a parametrization that cannot store ``W + ΔW``); nothing is merged.

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> merge(model) is model
        True
    """
    _require_whole_weights(model, "merge")
    pending = [(name, adapter) for name, adapter in adapters(model) if adapter.mergeable and not adapter.merged]
    refused = [(name, adapter, problem) for name, adapter in pending
               if (problem := adapter.merge_problem()) is not None]
    if refused:  # before any weight changes: all layers or none
        name, layer, problem = refused[0]
        raise TypeError(
            f"merge() changed nothing: {len(refused)} LoRA layer(s) cannot take their update into the weight, e.g. "
            f"{name!r} ({type(layer.base_layer).__name__}): {problem}. Keep the adapters unmerged, or leave such "
            f"layers out with exclude_modules (all: {', '.join(repr(n) for n, _, _ in refused[:8])}"
            f"{', ...' if len(refused) > 8 else ''})."
        )
    for _, adapter in pending:
        adapter.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapter updates back out of the base weights, in place; returns ``model``.

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> unmerge(merge(model)) is model
        True
    """
    _require_whole_weights(model, "unmerge")
    for _, adapter in adapters(model):
        if adapter.mergeable and adapter.merged:
            adapter.unmerge()
    return model


def _require_whole_weights(model: nn.Module, action: str) -> None:
    if any(is_partitioned(p) for p in model.parameters()):
        raise ValueError(
            f"{action} changes whole base weights, but DeepSpeed ZeRO-3 holds only this rank's partition of them. "
            "Save the adapter (save_adapter on every rank, or lightning-peft-export of the checkpoint directory), "
            f"load it into the model outside DeepSpeed, and {action} there."
        )


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base modules back: no lightning_peft code is left in ``model``.

    Raises:
        TypeError: The model holds adapters that cannot be merged (prompts, prefixes); call :func:`unload`
            to drop them, or keep the adapted model.
    """
    blocking = [name for name, adapter in adapters(model) if not adapter.mergeable]
    if blocking:
        raise TypeError(
            f"merge_and_unload() cannot fold {', '.join(blocking[:5])} into weights: prompt and prefix adapters "
            "change activations. Keep the adapted model for inference, or call unload() to drop them."
        )
    merge(model)
    for _, adapter in adapters(model):
        adapter.merged = False  # the updates now belong to the base weights: unload() must not take them out
    return _remove_adapters(model, keep_weights=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging, restoring the base modules (trained updates are dropped) and the ties
    LoRA undid (see :mod:`lightning_peft.lora.tied`)."""
    return _remove_adapters(model, keep_weights=False)


def _remove_adapters(model: nn.Module, keep_weights: bool) -> nn.Module:
    for name, adapter in reversed(list(adapters(model))):
        if adapter.merged:
            adapter.unmerge()
        base = adapter.unwrap()
        if name:
            replace_module(model, name, base)
        else:
            raise TypeError("unload() needs the model that holds the adapter, not the adapter itself.")
    forget_injection(model, keep_weights)  # marks, hooks, methods, parked named adapters, undo steps
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def enable_input_grads(model: nn.Module, module: str | None = None) -> nn.Module:
    """Make the output of the input layer require grad, for *reentrant* activation checkpointing.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` only back-propagates into a block whose inputs require
    grad; behind a frozen embedding none do, and adapters inside the block get no gradient. Non-reentrant
    checkpointing (``use_reentrant=False``, PyTorch's recommendation) and transformers' own checkpointing need
    nothing. Returns ``model``; :func:`unload` removes the hook.

    Args:
        model: The adapted model.
        module: Name of the layer whose output feeds the checkpointed blocks; by default a transformers model's
            ``get_input_embeddings()``.
    """
    if module is not None:
        layer = model.get_submodule(module)
    elif callable(get_input_embeddings := getattr(model, "get_input_embeddings", None)):
        layer = get_input_embeddings()
    else:
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings(); pass module= the name of the layer whose output "
            "feeds the checkpointed blocks (e.g. module='embed')."
        )
    add_peft_hook(layer, layer.register_forward_hook(_output_requires_grad))
    return model


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside this ``with`` block every adapter is switched off, afterwards back on.

    (To switch adapters off for good, ``set_adapter(model, None)``; see :mod:`lightning_peft.named`.)

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> with adapters_disabled(model):
        ...     y = model(torch.ones(1, 4))
    """
    switched = [adapter for _, adapter in adapters(model) if adapter.enabled]
    for adapter in switched:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter in switched:
            adapter.enabled = True


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of an adapted model."""

    trainable: int
    total: int
    adapter: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable, total and adapter-owned parameters (shared parameters counted once).

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> print(trainable_summary(inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))))
        trainable params: 16 || all params: 36 || trainable%: 44.4444
    """
    params = {id(p): p for p in model.parameters()}
    owned = {id(t) for _, a in adapters(model) for _, t in a.adapter_tensors() if isinstance(t, nn.Parameter)}
    return TrainableSummary(
        trainable=sum(global_shape(p).numel() for p in params.values() if p.requires_grad),
        total=sum(global_shape(p).numel() for p in params.values()),
        adapter=sum(global_shape(p).numel() for i, p in params.items() if i in owned),
    )

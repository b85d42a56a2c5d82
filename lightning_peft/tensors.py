"""Adapter tensors and the one rule that names them.

An adapter checkpoint holds the tensors adapters own (outside their ``base_layer``) and the base tensors marked to
train with them (``trainable_modules``, ``batchnorm="update"``). Both are found from the module tree, so any
sub-tree of an adapted model can be saved or loaded on its own; :func:`adapter_name_test` decides from names alone,
and :func:`adapter_state_dict` collects them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_peft.adapter import Adapter
from lightning_peft.record import find_record, record
from lightning_peft.zero3 import gathered


def mark_trainable(module: nn.Module, names: set[str] | None = None) -> None:
    """Mark local tensors of ``module`` (all of them by default) to be trained and saved with the adapter."""
    local = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    chosen = local if names is None else names & local
    record(module).saved_tensors = marked(module) | chosen


def marked(module: nn.Module | None) -> frozenset[str]:
    """Local names of the tensors of ``module`` marked to train and save with the adapter (``trainable_modules``,
    ``batchnorm="update"``); empty for ``None``."""
    found = find_record(module)
    return found.saved_tensors if found is not None else frozenset()


def refresh_trainable(model: nn.Module) -> None:
    """Set ``requires_grad`` from the adapter tree: adapter parameters and marked tensors train, nothing else."""
    trainable = {id(p) for _, p in adapter_tensors(model, include_buffers=False)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


_WRAPPER_PARTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def clean_name(name: str) -> str:
    """A tensor name without the wrapper parts FSDP, activation checkpointing and ``torch.compile`` insert
    (the names their state dicts use): ``"_fsdp_wrapped_module.layer.0"`` -> ``"layer.0"``."""
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


def base_name(name: str) -> str:
    """The base model's name for a module or tensor: without wrapper parts and adapters' ``base_layer`` parts.

    Example:
        >>> base_name("_fsdp_wrapped_module.conv1.base_layer.base_layer.weight")
        'conv1.weight'
    """
    return _BASE_LAYER.sub("", f".{clean_name(name)}.")[1:-1]


_BASE_LAYER = re.compile(r"(?<=\.)base_layer\.")


def adapter_tensors(model: nn.Module, include_buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(full name, tensor)`` for every tensor an adapter checkpoint holds: adapter tensors and marked ones, i.e.
    the model's parameters (and persistent buffers) whose names pass :func:`adapter_name_test`.

    Names are those of ``model.state_dict()``, without wrapper parts (see :func:`clean_name`)."""
    is_adapter_tensor = adapter_name_test(model)
    seen: set[int] = set()  # a tensor shared by two modules counts once, as in named_parameters()
    for name, module in model.named_modules():
        prefix = f"{clean_name(name)}." if clean_name(name) else ""
        tensors = list(module.named_parameters(recurse=False))
        if include_buffers:
            tensors += [(local, buffer) for local, buffer in module.named_buffers(recurse=False)
                        if local not in module._non_persistent_buffers_set]
        for local, tensor in tensors:
            if id(tensor) not in seen and is_adapter_tensor(prefix + local):
                seen.add(id(tensor))
                yield prefix + local, tensor


def adapter_name_test(model: nn.Module) -> Callable[[str], bool]:
    """Whether a ``model.state_dict()`` name is an adapter checkpoint's tensor, decided from names alone: the one
    rule behind :func:`adapter_tensors`, also for state dicts whose tensors the modules do not hold (FSDP1 with
    ``use_orig_params=False`` moves the parameters into flat ones; the module tree and the state dict's names stay).

    A name is an adapter tensor when its module marked it (``trainable_modules``), or when the nearest adapter above
    it does not hold it under ``base_layer``. FSDP1's flattened storage (``_flat_param``) is none.
    """
    modules = {clean_name(name): module for name, module in model.named_modules()}

    def test(name: str) -> bool:
        name = clean_name(name)  # a compiled submodule's state dict keeps "_orig_mod" in its names
        owner, _, local = name.rpartition(".")
        if local in marked(modules.get(owner)):
            return True
        if local == "_flat_param":
            return False
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # the nearest adapter above the tensor
            if isinstance(modules.get(".".join(parts[:depth])), Adapter):
                return parts[depth] != "base_layer"
        return False

    return test


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds: adapter parameters and buffers, plus ``trainable_modules``.

    Keys are the names in ``model.state_dict()``; the frozen base weights are left out. Under DeepSpeed ZeRO-3
    the partitioned tensors are gathered, so call it on every rank; the result holds full copies.

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoRA(r=2, target_modules=["0"],
        ...                trainable_modules=["1"]))
        >>> sorted(adapter_state_dict(model))
        ['0.lora_A', '0.lora_B', '1.bias', '1.weight']
    """
    tensors = dict(adapter_tensors(model))
    with gathered(tensors.values()) as partitioned:
        if partitioned:  # the gathered data is released on exit
            return {name: tensor.detach().clone() for name, tensor in tensors.items()}
    return {name: tensor.detach() for name, tensor in tensors.items()}

"""Tied weights under LoRA: an adapted layer's weight is its own.

A layer whose weight is shared with another module (GPT-2's ``wte`` and ``lm_head``) gets its own copy of the
weight at inject, with a :class:`~lightning_peft.errors.PEFTWarning`; the other module keeps the original. So the
update acts on the adapted layer only, before and after ``merge()`` (HF PEFT's unmerged semantics; PEFT's own merge
would also change the tied module). transformers models forget the tie too (``config.tie_word_embeddings`` and
``all_tied_weights_keys``), so ``save_pretrained`` of the merged model keeps both weights. ``unload()`` ties the
weight again and restores transformers' bookkeeping; after ``merge_and_unload()`` the layer keeps its own merged
weight.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn

from lightning_peft.errors import PEFTWarning
from lightning_peft.record import record


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter of ``model`` that more than one module holds (a tied weight)."""
    seen: set[int] = set()
    tied: set[int] = set()
    for module in model.modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                (tied if id(param) in seen else seen).add(id(param))
    return tied


def untie(model: nn.Module, name: str, layer: nn.Module) -> list[str]:
    """Give ``layer`` (named ``name`` in ``model``) its own copy of every parameter it shares; returns their names."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, f"{module_name}.{local}" if module_name else local))
    untied = []
    for local, param in list(layer._parameters.items()):
        found = owners.get(id(param), []) if param is not None else []
        own = next((n for m, n in found if m is layer), f"{name}.{local}")
        others = [n for m, n in found if m is not layer]
        if not others or param is None:
            continue
        layer._parameters[local] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        untied.append(own)
        forgotten = _forget_tie(model, own, others)
        record(layer).undo.append(functools.partial(_retie, layer, local, param, forgotten))
        warnings.warn(
            f"LoRA on {name!r}: its {local} is tied to {others}; the tie is undone (a copy for {name!r}), so the "
            f"update changes {name!r} only, before and after merge, and the tied module keeps the original weight.",
            PEFTWarning, stacklevel=3,
        )
    return untied


Forgotten = list[tuple[Any, str, Any]]  # (mapping or config, key or attribute, the value it had)


def _forget_tie(model: nn.Module, *names: str | list[str]) -> Forgotten:
    """Drop the tie from transformers' bookkeeping so ``save_pretrained``/``tie_weights`` do not restore it; returns
    what it changed."""
    forgotten: Forgotten = []
    flat = {n for group in names for n in ([group] if isinstance(group, str) else group)}
    for host_name, host in model.named_modules():
        keys = getattr(host, "all_tied_weights_keys", None)
        if not isinstance(keys, dict):
            continue
        prefix = f"{host_name}." if host_name else ""
        relative = {n.removeprefix(prefix) for n in flat if n.startswith(prefix)}
        for target, source in list(keys.items()):
            if target in relative or source in relative:
                forgotten.append((keys, target, keys.pop(target)))
        config = getattr(host, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False) and relative:
            forgotten.append((config, "tie_word_embeddings", True))
            config.tie_word_embeddings = False
    return forgotten


def _retie(layer: nn.Module, local: str, shared: nn.Parameter, forgotten: Forgotten, keep_weights: bool) -> None:
    """Give ``layer`` the shared weight back and restore the bookkeeping (``unload``); with ``keep_weights``
    (``merge_and_unload``) the layer keeps its own, merged weight."""
    if keep_weights:
        return
    layer._parameters[local] = shared
    for holder, key, value in forgotten:
        if isinstance(holder, dict):
            holder[key] = value
        else:
            setattr(holder, key, value)

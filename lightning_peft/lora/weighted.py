r"""Weighted merging of named LoRA adapters into a new named adapter (PEFT's ``add_weighted_adapter``).

::

    add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "ab")      # Σ w_i · s_i B_i A_i at every layer, rank r_a + r_b

The sources are named adapters (:mod:`lightning_peft.named`) on the same layers; the result is one more named
adapter, a plain ``LoRAConfig`` one (rank per layer, scale 1), that switches, trains, merges, saves and exports
like any other. The arithmetic per layer is :mod:`lightning_peft.lora.combine`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from lightning_peft.adapter import adapters as adapter_modules
from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.combine import PRUNING, Combination, SignMethod, Update, combine
from lightning_peft.lora.config import LoRAConfig
from lightning_peft.lora.layers import LoRALayer
from lightning_peft.lora.sources import plain_lora_layers
from lightning_peft.methods import check_choice
from lightning_peft.named import (
    active_adapter,
    add_adapter,
    delete_adapter,
    list_adapters,
    same_layers,
    set_adapter,
)

_Pairs = list[tuple[str, str]]


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination_type: Combination = "cat",
    *,
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    seed: int = 0,
) -> nn.Module:
    """Add the named adapter ``name`` that combines the LoRA adapters ``adapters`` with ``weights``; it becomes the
    active one. Returns ``model``.

    Definitions are PEFT's (:mod:`lightning_peft.lora.combine` writes them out): ``"cat"`` is exactly
    ``Σ w_i ΔW_i`` (``ΔW_i = s_i B_i A_i``) at rank ``Σ r_i``; ``"svd"`` is its best rank-``svd_rank``
    approximation (exact at ``Σ r_i``); ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` and
    ``"magnitude_prune"`` combine the A's and the B's separately (equal ranks; not ``Σ w_i ΔW_i`` for two or more
    sources); the ``*_svd`` forms apply those rules to the ``ΔW_i`` and truncate like ``"svd"``. Weights may be
    negative (``[1, -1]`` subtracts). The new adapter has scale 1, ``requires_grad`` like any adapter, and takes
    dropout, init, ``conv_groups``, ``conv_path``, seed and dtype from the first source's LoRA configuration.

    Differences from PEFT: the default is ``"cat"`` (exact; PEFT's is ``"svd"``); the sources must adapt the same
    layers (PEFT takes a layer missing from a source as a zero update); one source keeps the combination asked for
    (PEFT switches to ``"linear"``); ``svd_rank`` defaults to the largest source rank *per layer*; DARE draws from
    ``seed``, not from torch's global generator; the new name must be free (PEFT returns silently).

    Args:
        model: The model holding the named adapters (see :func:`~lightning_peft.add_adapter`).
        adapters: Names of the LoRA adapters to combine (``"default"`` for an unnamed one).
        weights: One weight per adapter.
        name: The new adapter's name.
        combination_type: How to combine (see above).
        svd_rank: Rank of the ``svd`` family's result; default the largest source rank at each layer.
        density: Fraction of entries kept, in ``(0, 1]``, for ``ties``, ``dare_*`` and ``magnitude_prune``
            (with or without ``_svd``); required there, refused elsewhere.
        majority_sign_method: TIES sign election: ``"total"`` (sign of the sum) or ``"frequency"`` (majority of
            signs).
        seed: Seed of DARE's random masks (one ``torch.Generator``, so every process draws the same merge).

    Raises:
        KeyError: An adapter name is unknown (the message lists the model's adapters).
        ValueError: An unknown ``combination_type`` (the message names the choices); ``name`` is taken; weights and
            adapters of different lengths; a missing or out-of-range ``density``, or one given where it is unused;
            an adapter holds another method (prefix, prompt) or ``target_parameters``, or trains base tensors
            (``trainable_modules``, ``bias``); the adapters adapt different layers, or a layer differently (type,
            groups, unequal ranks for the factor rules).

    Example:
        >>> from lightning_peft import LoRAConfig, add_adapter, inject
        >>> model = inject(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
        >>> model = add_adapter(model, "other", LoRAConfig(r=1, target_modules=["0"]))
        >>> model = add_weighted_adapter(model, ["default", "other"], [1.0, -0.5], "mix")
        >>> model[0].r, model[0].scale
        (3, 1.0)
    """
    check_choice("combination_type", combination_type, Combination)
    check_choice("majority_sign_method", majority_sign_method, SignMethod)
    _check_arguments(model, list(adapters), list(weights), name, combination_type, svd_rank, density, seed)
    sources = [plain_lora_layers(model, source, "add_weighted_adapter") for source in adapters]
    layers = _same_layers(list(adapters), [layers for layers, _ in sources])
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    ranks: dict[str, int] = {}
    for layer in layers:
        group = [found[layer] for found, _ in sources]
        pairs = _pairs(group[0])
        ranks[layer] = _new_rank(layer, group, combination_type, svd_rank)
        results[layer] = [
            combine([_update(adapter, a_name, b_name) for adapter in group], list(weights), combination_type,
                    ranks[layer], 1.0 if density is None else density, majority_sign_method, generator)
            for a_name, b_name in pairs
        ]
    config = _merged_config(sources[0][1], layers, ranks)
    previous = active_adapter(model)
    add_adapter(model, name, config)
    try:
        built = dict(adapter_modules(model))
        with torch.no_grad():
            for layer, combined in results.items():
                adapter = cast(LoRALayer, built[layer])
                for (a_name, b_name), (a, b) in zip(_pairs(adapter), combined, strict=True):
                    a_param, b_param = getattr(adapter, a_name), getattr(adapter, b_name)
                    a_param.copy_((a / adapter.scale).reshape(a_param.shape))
                    b_param.copy_(b.reshape(b_param.shape))
    except Exception:
        set_adapter(model, previous)
        delete_adapter(model, name)
        raise
    return model


def _check_arguments(model: nn.Module, adapters: list[str], weights: list[float], name: str, how: str,
                     svd_rank: int | None, density: float | None, seed: int) -> None:
    existing = list_adapters(model)
    if not adapters:
        raise ValueError(f"add_weighted_adapter needs at least one adapter to combine; the model has {existing}.")
    unknown = [a for a in adapters if a not in existing]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r}; the model has {existing}.")
    if name in existing:
        raise ValueError(f"an adapter named {name!r} exists already ({existing}); pick another name for the merge.")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter got {len(adapters)} adapters and {len(weights)} weights; give one "
                         "weight per adapter.")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers (negative ones subtract); got {bad[0]!r}.")
    pruning = how.removesuffix("_svd") in PRUNING
    if pruning and (density is None or not 0 < density <= 1):
        raise ValueError(f"combination_type={how!r} needs density in (0, 1] (the fraction of entries kept); got "
                         f"{density!r}.")
    if not pruning and density is not None:
        raise ValueError(f"density applies to {', '.join(PRUNING)} (and their _svd forms), not to "
                         f"combination_type={how!r}; leave it out.")
    if svd_rank is not None and not how.endswith("svd"):
        raise ValueError(f"svd_rank applies to the svd combinations, not to combination_type={how!r}; leave it out.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer; got {svd_rank!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}.")


def _same_layers(names: list[str], found: list[dict[str, LoRALayer]]) -> list[str]:
    """The layer names all sources adapt, in the first source's (module) order; raises where they differ."""
    same_layers(names, found, "add_weighted_adapter combines adapters of the same layers")
    first = found[0]
    for source, layers in zip(names[1:], found[1:], strict=True):
        for layer, adapter in layers.items():
            if first[layer].groups != adapter.groups:
                raise ValueError(
                    f"adapters {names[0]!r} and {source!r} adapt {layer!r} with {first[layer].groups} vs "
                    f"{adapter.groups} group(s) (conv_groups differs?); their updates have different layouts."
                )
    return list(first)


def _new_rank(layer: str, group: list[LoRALayer], how: Combination, svd_rank: int | None) -> int:
    ranks = [adapter.r for adapter in group]
    groups = group[0].groups
    if how == "cat":
        return sum(ranks)
    if how.endswith("svd"):
        rank = svd_rank if svd_rank is not None else max(ranks)
        if rank % groups:
            raise ValueError(f"svd_rank={rank} at {layer!r} must be a multiple of its {groups} groups "
                             "(conv_groups='per_group' keeps a rank per group).")
        return rank
    if len(set(ranks)) > 1:
        raise ValueError(f"combination_type={how!r} adds the A's and the B's of {layer!r}, which needs equal ranks; "
                         f"got {ranks}. Use 'cat' (exact) or 'svd' for adapters of different ranks.")
    return ranks[0]


def _pairs(adapter: LoRALayer) -> _Pairs:
    """The ``(A, B)`` factor names of a LoRA layer: one pair, two for ``nn.MultiheadAttention``."""
    extra = [("lora_out_A", "lora_out_B")] if isinstance(adapter, LoRAMultiheadAttention) else []
    return [("lora_A", "lora_B"), *extra]


def _update(adapter: LoRALayer, a_name: str, b_name: str) -> Update:
    g, r = adapter.groups, adapter.r
    a, b = getattr(adapter, a_name).detach(), getattr(adapter, b_name).detach()
    return Update(a.reshape(g, r // g, -1), b.reshape(g, -1, r // g), adapter.scale)


def _merged_config(configs: list[LoRAConfig], layers: list[str], ranks: dict[str, int]) -> LoRAConfig:
    """A LoRA configuration of exactly ``layers`` at ``ranks`` with scale 1; the rest from the first source's."""
    exact = {layer: f"(?:{re.escape(layer)})" for layer in layers}  # a full-match regex: neither a suffix nor a class
    r = ranks[layers[0]]
    pattern = {exact[layer]: rank for layer, rank in ranks.items() if rank != r}
    return dataclasses.replace(
        configs[0], r=r, alpha=float(r), rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()},
        rslora=False, bias="none", target_parameters=None, target_modules="|".join(exact.values()),
        exclude_modules=None, layers=None, layers_pattern=None, trainable_modules=None, batchnorm="frozen",
    )

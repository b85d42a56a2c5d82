"""A cheap fingerprint of the base weights an adapter was trained on, so loading it onto other weights is noticed.

Shapes alone do not tell two ResNet-18s apart: an adapter trained on one loads into the other (or into a model
whose pretrained weights were never loaded) and silently computes something else. Adapter files and adapter-only
checkpoints therefore record, for every adapted layer, :data:`SAMPLES` values of its base weight at fixed
positions (spread evenly over the tensor). That costs a handful of indexing operations per layer whatever its size
(measured: ``benchmarks/`` README section), and two different trainings or random initialisations differ at
essentially every position. Values are compared with a relative tolerance of 1e-2, so the same weights loaded in
another dtype (bfloat16, float16) still match.

Defined cases: a layer whose adapter is merged is not fingerprinted (its weight holds the update); neither are
weights on the meta device or sharded (FSDP, DeepSpeed ZeRO-3: only a slice is local). PiSSA layers are
fingerprinted with their residual, which injecting PiSSA into the same base recomputes exactly. Files without a
fingerprint load as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import adapters, innermost
from lightning_peft.tensors import base_name, clean_name
from lightning_peft.zero3 import is_partitioned

SAMPLES = 8
"""Values recorded per adapted layer."""

RTOL = 1e-2
"""Relative tolerance of the comparison (bfloat16 keeps about 3 significant digits)."""


def base_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """``{base tensor name: values}`` of the first weight of every layer an unmerged adapter of ``model`` adapts.

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> list(base_fingerprint(model)), len(base_fingerprint(model)["0.weight"])
        (['0.weight'], 8)
    """
    found: dict[str, list[float]] = {}
    for name, adapter in adapters(model):
        if adapter.merged:
            continue
        layer = innermost(adapter)
        local, weight = next(((n, p) for n, p in layer.named_parameters() if p.is_floating_point()), ("", None))
        if (weight is None or weight.is_meta or is_partitioned(weight) or not weight.numel()
                or type(weight) not in (torch.Tensor, nn.Parameter)):
            continue  # nothing to read, or only a shard of it here (FSDP's DTensor, ZeRO-3)
        found.setdefault(base_name(f"{clean_name(name)}.{local}"), _samples(weight))
    return found


def _samples(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, SAMPLES, device=flat.device).round().long()
    return [float(v) for v in flat[positions].float().cpu()]


def _same(now: torch.Tensor, saved: torch.Tensor) -> bool:
    """Equal to :data:`RTOL` of each value, or of the values' mean size (for values near zero)."""
    return torch.allclose(now, saved, rtol=RTOL, atol=RTOL * float(saved.abs().mean()) + 1e-12)


def fingerprint_mismatch(model: nn.Module, saved: Any, source: str) -> str | None:
    """Why ``model``'s base weights are not those ``saved`` was taken of, or ``None`` (also for no fingerprint)."""
    if not isinstance(saved, dict) or not saved:
        return None
    now = base_fingerprint(model)
    common = [name for name in saved if name in now]
    differ = [name for name in common if not _same(torch.tensor(now[name]), torch.tensor(saved[name]))]
    if not differ:
        return None
    first = differ[0]
    shown = ", ".join(f"{v:.4g}" for v in saved[first][:3]), ", ".join(f"{v:.4g}" for v in now[first][:3])
    return (f"{source} was trained on other base weights than {type(model).__name__} holds: {len(differ)} of "
            f"{len(common)} adapted layers differ ({', '.join(differ[:3])}; {first} saved [{shown[0]}, ...], model "
            f"[{shown[1]}, ...]). Load the pretrained weights it was trained on into the model first.")

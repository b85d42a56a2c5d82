"""HF PEFT's LoRA held to the checks of ``tests/zoo_checks.check_cell``, for the zoo benchmarks.

One cell: ``get_peft_model`` with ``LoraConfig(target_modules=<the modules lightning_peft adapts>)`` on a copy of
the base, then identity at init, a non-zero gradient on every ``lora_`` tensor once the adapters moved, outputs
that move, ``merge_adapter``/``unmerge_adapter`` exact, ``save_pretrained`` then ``PeftModel.from_pretrained``
exact. The verdict is ``OK`` or the first check that failed.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable

import torch
from torch import nn
from zoo_checks import Inputs, relative_diff, run


def short(error: BaseException, words: int = 12) -> str:
    """``ErrorClass: first words of its message`` (no newlines or table bars)."""
    text = str(error).replace("\n", " ").replace("|", "/").split()
    return f"{type(error).__name__}: {' '.join(text[:words])}"


def peft_lora_cell(base: nn.Module, inputs: Inputs, target_modules: Iterable[str], *, move: float,
                   tol: float = 1e-5, r: int = 4, alpha: float = 16) -> tuple[str, int]:
    """PEFT LoRA on ``target_modules`` of a copy of ``base``: the verdict and its trainable LoRA values."""
    import peft

    base = base.eval()
    with torch.no_grad():
        reference = run(base, inputs)
    try:
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=sorted(target_modules))).eval()
    except Exception as error:  # noqa: BLE001 - the table records every failure
        return f"error at inject ({short(error)})", 0
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    count = sum(p.numel() for p in lora.values())
    with torch.no_grad():
        identity = relative_diff(run(model, inputs), reference)
        if identity > tol:
            return f"FAIL (injected model differs from base by {identity:.1e})", count
        generator = torch.Generator().manual_seed(1)
        for parameter in lora.values():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                           .to(parameter.dtype) * move)
    adapted = run(model, inputs)
    adapted.square().mean().backward()
    silent = [n for n, p in lora.items() if p.grad is None or not bool(p.grad.ne(0).any())]
    if silent:
        return f"FAIL ({len(silent)} of {len(lora)} LoRA tensors get no gradient, e.g. {silent[0]})", count
    adapted = adapted.detach()
    moved = relative_diff(adapted, reference)
    if moved <= 100 * tol:
        return f"FAIL (moving the adapters changed the outputs by only {moved:.1e})", count
    try:
        with torch.no_grad():
            model.merge_adapter()
            merged = relative_diff(run(model, inputs), adapted)
            model.unmerge_adapter()
            unmerged = relative_diff(run(model, inputs), adapted)
    except Exception as error:  # noqa: BLE001
        return f"no merge ({short(error, 10)})", count
    if max(merged, unmerged) > tol:
        return f"FAIL (merged outputs differ by {merged:.1e}, unmerged by {unmerged:.1e})", count
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save_pretrained(folder)
            fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        except Exception as error:  # noqa: BLE001
            return f"no save/load ({short(error, 10)})", count
        with torch.no_grad():
            reloaded = relative_diff(run(fresh, inputs), adapted)
    if reloaded > tol:
        return f"FAIL (reloaded outputs differ by {reloaded:.1e})", count
    return "OK", count

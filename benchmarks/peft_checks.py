"""HF PEFT held to the checks of ``tests/zoo_checks.check_cell``, for the zoo benchmarks.

LoRA: ``get_peft_model`` with ``LoraConfig(target_modules=<the modules lightning_peft adapts>)`` on a copy of the
base, then identity at init, a non-zero gradient on every ``lora_`` tensor once the adapters moved, outputs that
move, ``merge_adapter``/``unmerge_adapter`` exact, ``save_pretrained`` then ``PeftModel.from_pretrained`` exact.

Prompt and prefix tuning (virtual tokens): the model with adapters disabled equals the base, every trainable
tensor gets a non-zero finite gradient once they moved, the outputs at the real tokens' positions move (PEFT
returns the virtual tokens' positions too: an output with ``p`` more positions along one axis is compared on its
last positions), and a reload is exact. The verdict is ``OK`` or the first check that failed (a
``disable_adapter`` that raises is reported with the verdict of the other checks).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from zoo_checks import Inputs, call, float_outputs, output_tensors, relative_diff, run


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


def _at_real_positions(adapted: Any, reference: Any, virtual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs flattened, each adapted tensor cut to the reference's shape: along the one axis where it is
    ``virtual`` positions longer, its last positions (the real tokens')."""
    mine, theirs = output_tensors(adapted), output_tensors(reference)
    if len(mine) != len(theirs):
        raise AssertionError(f"the adapted model returns {len(mine)} tensors, the base {len(theirs)}")
    cut = []
    for a, b in zip(mine, theirs, strict=True):
        longer = [axis for axis in range(a.dim()) if a.dim() == b.dim() and a.shape[axis] == b.shape[axis] + virtual]
        if a.shape != b.shape and len(longer) == 1:
            a = a.narrow(longer[0], virtual, b.shape[longer[0]])
        if a.shape != b.shape:
            raise AssertionError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        cut.append(a)
    return float_outputs(cut), float_outputs(theirs)


def peft_virtual_token_cell(base: nn.Module, inputs: Inputs, config: Any, *, move: float,
                            tol: float = 1e-5) -> str:
    """PEFT prompt or prefix tuning (``config``) on a copy of ``base``, through the checks above: the verdict."""
    import peft

    base = base.eval()
    with torch.no_grad():
        reference = call(base, inputs)
    try:
        model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    except Exception as error:  # noqa: BLE001 - the table records every failure
        return f"error ({short(error, 8)})"
    no_disable = ""  # disable_adapter raising is recorded, and the other checks still run
    try:
        with torch.no_grad(), model.disable_adapter():
            disabled = relative_diff(run(model, inputs), run(base, inputs))
        if disabled > tol:
            return f"FAIL (disabled model differs from base by {disabled:.1e})"
    except Exception as error:  # noqa: BLE001
        no_disable = f"disable_adapter raises {short(error, 6)}"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in trainable.values():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * move)
    try:
        output = call(model, inputs)
        flat = float_outputs(output)
        flat.square().mean().backward()
    except Exception as error:  # noqa: BLE001
        return f"error ({short(error, 8)})"
    silent = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.ne(0).any())]
    if silent or not all(bool(p.grad.isfinite().all()) for p in trainable.values() if p.grad is not None):
        return f"FAIL ({len(silent)} of {len(trainable)} trainable tensors get no gradient or a non-finite one)"
    try:
        adapted, base_flat = _at_real_positions(output, reference, config.num_virtual_tokens)
    except AssertionError as error:
        return f"FAIL ({error})"
    moved = relative_diff(adapted.detach(), base_flat)
    if moved <= 100 * tol:
        return f"FAIL (moving the virtual tokens changed the outputs by only {moved:.1e})"
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save_pretrained(folder)
            fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
            with torch.no_grad():
                reloaded = relative_diff(run(fresh, inputs), flat.detach())
        except Exception as error:  # noqa: BLE001
            return f"no save/load ({short(error, 10)})"
    if reloaded > tol:
        return f"FAIL (reloaded outputs differ by {reloaded:.1e})"
    return f"{no_disable}; the other checks OK" if no_disable else "OK"

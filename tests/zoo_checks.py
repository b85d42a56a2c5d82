"""The checks every model-zoo cell (one model x one method) must pass, shared by the zoo sweeps.

``check_cell`` proves, for one base model and one method, with the base model's own outputs as the reference:

1. the disabled adapters give the base outputs (every method), and the freshly injected model gives them too
   for methods that start as the identity (LoRA, gated prefixes, pixel prompts);
2. exactly the adapter tensors require grad, and each of them gets a non-zero gradient once the adapters have
   moved off their initial values (a LoRA ``A`` gets none while ``B`` is zero, by the method's definition);
3. the outputs change once the adapters move, and eval under ``no_grad`` gives the same outputs as eval with
   gradients (no fused inference path drops an adapter); a training-mode forward runs too: the participation
   check (``lightning_peft.guard``) raises if any adapter is left out in train, eval or eval under ``no_grad``;
4. for mergeable methods, ``merge`` gives the adapted outputs and ``unmerge`` gives them back;
5. ``save_adapter`` then ``load_adapter`` into a fresh copy of the base gives the same adapter tensors, bit for
   bit, and the same outputs.

Tolerances are relative to the size of the reference output: ``max|a - b| <= tol * max(1, max|b|)``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft import adapters_disabled, inject, load_adapter, merge, save_adapter, unmerge
from lightning_peft.methods import Method
from lightning_peft.tensors import adapter_tensors

Inputs = Mapping[str, Any] | Sequence[Any]


@dataclass
class CellReport:
    """What one cell measured: largest output differences, relative to the reference's size."""

    identity: float  # injected (or disabled, when the method does not start as the identity) vs base
    moved: float  # adapted after the adapters moved vs base: must be clearly non-zero
    merged: float | None  # merged vs adapted (mergeable methods)
    reloaded: float  # save + load into a fresh base vs adapted
    adapter_tensors: int
    adapter_values: int  # trainable numbers the adapters add


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (tensors, tuples, dicts, ``ModelOutput``), in order."""
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                found.append(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(output)
    return found


def float_outputs(output: Any) -> torch.Tensor:
    """Every floating-point tensor in a model's output, flattened and concatenated: the whole output is compared,
    not just one head."""
    found = output_tensors(output)
    if not found:
        raise TypeError(f"the model returned no floating-point tensor ({type(output).__name__})")
    return torch.cat([t.reshape(-1).float() for t in found])


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max(1, max|b|)``; shapes must agree."""
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model``'s output for ``inputs`` (keyword arguments or positional ones)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def run(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The model's flattened floating-point outputs for ``inputs``."""
    return float_outputs(call(model, inputs))


def nondegenerate(model: nn.Module, seed: int = 2) -> nn.Module:
    """Give the zero-initialised weights of a randomly initialised model (torchvision ViT's head, zero-gamma
    residual BatchNorms) small random values in place, so that every layer reaches the output; returns ``model``.
    Without it a zero head makes the output constant and no adapter could get a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            degenerate = parameter.is_floating_point() and not parameter.any()
            if degenerate and (parameter.dim() > 1 or name.endswith("weight")):
                centre = 1.0 if parameter.dim() == 1 else 0.0  # a zero gamma becomes about 1, a zero matrix small
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02 + centre)
    return model


def move_adapters(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Shift every adapter tensor by seeded noise, as training would (a LoRA ``B`` leaves zero, gates open)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in adapter_tensors(model, include_buffers=False):
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.add_(noise.to(tensor.dtype) * scale)


def check_cell(
    base: nn.Module,
    method: Method,
    inputs: Inputs,
    tmp_path: Path,
    *,
    starts_as_identity: bool,
    mergeable: bool,
    tol: float = 1e-5,
    unused: Sequence[str] = (),
    move: float = 0.05,
) -> CellReport:
    """Run the five checks of this module on a copy of ``base`` (``base`` is left unchanged) adapted by ``method``;
    zero-initialised weights of the copy are made non-zero first (:func:`nondegenerate`).

    Args:
        base: The model, in eval mode or not (the checks run in eval mode: no dropout, BatchNorm statistics).
        method: The method object, e.g. ``LoRAConfig(r=8, target_modules="all-conv")``.
        inputs: Keyword arguments or positional arguments of one forward.
        tmp_path: Where the adapter is saved.
        starts_as_identity: Whether the injected model must equal the base before training.
        mergeable: Whether ``merge``/``unmerge`` apply (LoRA).
        tol: Relative tolerance of every equality.
        unused: Regexes of adapter tensor names that may get no gradient because the output does not use them
            (state why at the call).
        move: Spread of the seeded noise added to every adapter tensor before the later checks (a deep CNN with
            an adapter on each of 50+ convolutions needs a smaller one than a 2-layer transformer, or its
            activations saturate and gradients vanish).
    """
    base = nondegenerate(copy.deepcopy(base)).eval()
    with torch.no_grad():
        reference = run(base, inputs)
    model = inject(copy.deepcopy(base), method).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {n for n, _ in adapter_tensors(model, include_buffers=False)}
    assert adapter_names, f"{type(method).__name__} added no adapter tensor"
    assert trainable == adapter_names, (
        f"trainable but not adapters: {sorted(trainable - adapter_names)[:5]}; "
        f"adapters not trainable: {sorted(adapter_names - trainable)[:5]}"
    )
    with torch.no_grad():
        if starts_as_identity:
            identity = relative_diff(run(model, inputs), reference)
        else:
            with adapters_disabled(model):
                identity = relative_diff(run(model, inputs), reference)
    assert identity <= tol, f"{'injected' if starts_as_identity else 'disabled'} model differs from base by {identity}"

    move_adapters(model, scale=move)
    adapted = run(model, inputs)
    adapted.square().mean().backward()
    for name, parameter in model.named_parameters():
        if name not in trainable:
            assert parameter.grad is None, f"frozen {name} got a gradient"
        elif not any(re.search(rule, name) for rule in unused):
            assert parameter.grad is not None and bool(parameter.grad.ne(0).any()), f"adapter {name} got no gradient"
            assert bool(parameter.grad.isfinite().all()), f"adapter {name} got a non-finite gradient"
    adapted = adapted.detach()
    moved = relative_diff(adapted, reference)
    assert moved > 100 * tol, f"moving the adapters changed the outputs by only {moved}"
    with torch.no_grad():
        inference = relative_diff(run(model, inputs), adapted)
    assert inference <= tol, f"eval under no_grad differs from eval by {inference}"

    merged = None
    if mergeable:
        with torch.no_grad():
            merged = relative_diff(run(merge(model), inputs), adapted)
            again = relative_diff(run(unmerge(model), inputs), adapted)
        assert merged <= tol, f"merged outputs differ from the adapter path by {merged}"
        assert again <= tol, f"unmerged outputs differ from the adapter path by {again}"

    saved = {n: t.detach().clone() for n, t in adapter_tensors(model)}
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
    loaded = dict(adapter_tensors(fresh))
    assert loaded.keys() == saved.keys(), f"reloaded tensors differ: {sorted(loaded.keys() ^ saved.keys())[:5]}"
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), f"{name} changed through save and load"
    with torch.no_grad():
        reloaded = relative_diff(run(fresh, inputs), adapted)
    assert reloaded <= tol, f"reloaded outputs differ by {reloaded}"
    values = sum(tensor.numel() for name, tensor in saved.items() if name in trainable)
    assert bool(run(fresh.train(), inputs).isfinite().all())  # the participation check watches training mode too
    return CellReport(identity, moved, merged, reloaded, len(saved), values)


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` with the global RNG seeded first, so a cell's random base weights are reproducible."""
    torch.manual_seed(seed)
    return build()

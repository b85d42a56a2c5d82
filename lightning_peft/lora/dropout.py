r"""LoRA's input dropout without a dropped copy of the input kept for backward.

``nn.Dropout`` followed by ``A`` (what HF PEFT runs) keeps, per adapter, the dropped input ``m ⊙ x / (1-p)`` (as
large as ``x``) for ``A``'s gradient and the mask for ``x``'s: with ``p > 0``, q, k and v of one attention layer keep
three dropped copies of the hidden states they share. The gradients need less::

    h      = A (m ⊙ x) / (1-p)                      (r channels; B's linear keeps it, as it keeps A x without dropout)
    ∂L/∂A  = ∂L/∂h^T · (m ⊙ x) / (1-p)              needs x and m
    ∂L/∂x  = m ⊙ (∂L/∂h · A) / (1-p)                needs m and A

:func:`dropped_input` keeps ``x`` itself (the very tensor the base layer and sibling adapters read: no new storage),
``A`` (a parameter) and the mask as the seed it was drawn from (a Python int, no tensor memory): the backward redraws
the identical mask from a generator seeded with it. A 1-byte mask per adapter would be exact too, but costs a quarter
of ``x`` per adapter (22 MB on a 4-layer GPT-2 at 4 x 256 tokens, more than LoRA saves against full finetuning);
redrawing costs one uniform draw per adapter in backward (about 4 ms per 1024 x 768 on 2 CPU threads, while
``nn.Dropout`` alone takes 6 ms there). Under ``torch.compile`` Dynamo cannot trace a ``torch.Generator``, so the
mask is drawn from the global generator and kept as 1 byte per element instead (still a fifth of PEFT's cost).

A convolution's A (``LoRAConv``) works the same way: its backward rebuilds ``m ⊙ x`` from ``x`` and the seed and runs
the convolution's own backward on it (one ``r``-channel convolution recomputed). Under ``torch.compile`` a conv
adapter drops through ``F.dropout`` (a dropped copy, as PEFT), since that backward calls autograd.

Each adapter draws its own mask (adapters reading the same input do not share one), as ``nn.Dropout`` per adapter
does: that is the method as defined, and with seeds a shared mask would save nothing. Seeds come from the global CPU
generator, so ``torch.manual_seed`` makes runs reproducible, every call draws a fresh mask, and activation
checkpointing (which restores the RNG state before recomputing) redraws the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # A's product: (input, weight) -> r channels


def dropped_input(x: torch.Tensor, weight: torch.Tensor, p: float, op: Op = F.linear) -> torch.Tensor:
    """``op(m ⊙ x, weight) / (1-p)`` with a fresh keep-mask ``m`` (each element kept with probability ``1-p``).

    ``op`` is A's product: ``F.linear`` (Linear, Conv1D) or a convolution with the base layer's geometry. Computed in
    the autocast dtype (else ``weight``'s dtype), keeping for backward only ``x``, ``weight`` and the mask's seed (a
    1-byte mask under ``torch.compile``). ``p == 0``: ``op(x, weight)``.

    Example:
        >>> x, a = torch.ones(1000, 4), torch.ones(1, 4)
        >>> dropped_input(x, a, 0.5).unique().tolist()  # 2 x (how many of a row's 4 ones were kept)
        [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    if p == 0.0:
        return op(x, weight)
    if torch.compiler.is_compiling():
        if op is not F.linear:  # the convolution's backward below calls autograd, which Dynamo does not trace
            return op(F.dropout(x, p), weight)
        mask = torch.rand(x.shape, device=x.device) < 1.0 - p
        return _DroppedInput.apply(x, weight, p, 0, mask, op)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())  # global CPU generator: torch.manual_seed
    return _DroppedInput.apply(x, weight, p, seed, None, op)


def keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask of ``seed``: ``True`` with probability ``1-p`` per element, the same on every call."""
    generator = torch.Generator(device=like.device).manual_seed(seed)  # uniform < 1-p: 30% faster than bernoulli_
    return torch.rand(like.shape, generator=generator, device=like.device) < 1.0 - p


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _DroppedInput(torch.autograd.Function):
    """``h = op(m ⊙ x, W) / (1-p)``; the backward redraws ``m`` from its seed (or reads the saved mask)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int, mask: torch.Tensor | None,
                op: Op) -> torch.Tensor:
        dtype = _compute_dtype(x, weight)
        keep = keep_mask(x, p, seed) if mask is None else mask
        h = op(x.to(dtype) * keep, weight.to(dtype)) * (1.0 / (1.0 - p))  # scaled on r channels, not on x
        ctx.p, ctx.seed, ctx.dtype, ctx.op = p, seed, dtype, op
        ctx.save_for_backward(x, weight, *(() if mask is None else (mask,)))
        return h

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, *saved = ctx.saved_tensors
        keep = keep_mask(x, ctx.p, ctx.seed) if not saved else saved[0]
        grad_h = grad_h.to(ctx.dtype) * (1.0 / (1.0 - ctx.p))
        needs_x, needs_w = ctx.needs_input_grad[:2]
        if ctx.op is F.linear:  # written out: h (..., r), weight (r, in)
            grad_x = grad_w = None
            if needs_x:
                grad_x = (grad_h @ weight.to(ctx.dtype) * keep).to(x.dtype)  # (..., in)
            if needs_w:
                dropped = (x.to(ctx.dtype) * keep).reshape(-1, x.shape[-1])  # (N, in)
                grad_w = (grad_h.reshape(-1, grad_h.shape[-1]).T @ dropped).to(weight.dtype)  # (r, in)
            return grad_x, grad_w, None, None, None, None
        with torch.enable_grad():  # a convolution: its own backward, on the dropped input rebuilt from x and m
            dropped = (x.detach().to(ctx.dtype) * keep).requires_grad_(needs_x)
            detached = weight.detach().to(ctx.dtype).requires_grad_(needs_w)
            inputs = [t for t in (dropped, detached) if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.op(dropped, detached), inputs, grad_h))
        grad_x = (next(grads) * keep).to(x.dtype) if needs_x else None
        grad_w = next(grads).to(weight.dtype) if needs_w else None
        return grad_x, grad_w, None, None, None, None

r"""LoRA's input dropout without a dropped copy of the input kept for backward.

``nn.Dropout`` followed by ``A`` (what HF PEFT runs) keeps, per adapter, the dropped input ``m ⊙ x / (1-p)`` (as
large as ``x``) for ``A``'s gradient and the mask for ``x``'s: with ``p > 0``, q, k and v of one attention layer keep
three dropped copies of the hidden states they share. The gradients need less::

    h      = A (m ⊙ x) / (1-p)                      (r channels; B's linear keeps it, as it keeps A x without dropout)
    ∂L/∂A  = ∂L/∂h^T · (m ⊙ x) / (1-p)              needs x and m
    ∂L/∂x  = m ⊙ (∂L/∂h · A) / (1-p)                needs m and A

:func:`dropped_linear` keeps ``x`` itself (the very tensor the base layer and sibling adapters read: no new storage),
``A`` (a parameter) and the mask as the seed it was drawn from (a Python int, no tensor memory): the backward redraws
the identical mask from a generator seeded with it. A 1-byte mask per adapter would be exact too, but costs a quarter
of ``x`` per adapter (22 MB on a 4-layer GPT-2 at 4 x 256 tokens, more than LoRA saves against full finetuning);
redrawing costs one uniform draw per adapter in backward (about 4 ms per 1024 x 768 on 2 CPU threads, while
``nn.Dropout`` alone takes 6 ms there). Under ``torch.compile`` Dynamo cannot trace a ``torch.Generator``, so the
mask is drawn from the global generator and kept as 1 byte per element instead (still a fifth of PEFT's cost).

Each adapter draws its own mask (adapters reading the same input do not share one), as ``nn.Dropout`` per adapter
does: that is the method as defined, and with seeds a shared mask would save nothing. Seeds come from the global CPU
generator, so ``torch.manual_seed`` makes runs reproducible, every call draws a fresh mask, and activation
checkpointing (which restores the RNG state before recomputing) redraws the same one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def dropped_linear(x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
    """``A (m ⊙ x) / (1-p)`` with a fresh keep-mask ``m`` (each element kept with probability ``1-p``).

    Computed in the autocast dtype (else ``a``'s dtype), keeping for backward only ``x``, ``a`` and the mask's seed
    (a 1-byte mask under ``torch.compile``). ``p == 0``: ``F.linear(x, a)``.

    Example:
        >>> x, a = torch.ones(1000, 4), torch.ones(1, 4)
        >>> dropped_linear(x, a, 0.5).unique().tolist()  # 2 x (how many of a row's 4 ones were kept)
        [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    if p == 0.0:
        return F.linear(x, a)
    if torch.compiler.is_compiling():
        mask = torch.rand(x.shape, device=x.device) < 1.0 - p
        return _DroppedLinear.apply(x, a, p, 0, mask)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())  # global CPU generator: torch.manual_seed
    return _DroppedLinear.apply(x, a, p, seed, None)


def keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask of ``seed``: ``True`` with probability ``1-p`` per element, the same on every call."""
    generator = torch.Generator(device=like.device).manual_seed(seed)  # uniform < 1-p: 30% faster than bernoulli_
    return torch.rand(like.shape, generator=generator, device=like.device) < 1.0 - p


def _compute_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype


class _DroppedLinear(torch.autograd.Function):
    """``h = A (m ⊙ x) / (1-p)``; the backward redraws ``m`` from its seed (or reads the saved mask)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, p: float, seed: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        dtype = _compute_dtype(x, a)
        keep = keep_mask(x, p, seed) if mask is None else mask
        h = F.linear(x.to(dtype) * keep, a.to(dtype)) * (1.0 / (1.0 - p))  # scaled on r channels, not on x
        ctx.p, ctx.seed, ctx.dtype = p, seed, dtype
        ctx.save_for_backward(x, a, *(() if mask is None else (mask,)))
        return h

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, *saved = ctx.saved_tensors
        keep = keep_mask(x, ctx.p, ctx.seed) if not saved else saved[0]
        grad_h = grad_h.to(ctx.dtype) * (1.0 / (1.0 - ctx.p))  # (..., r)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ a.to(ctx.dtype) * keep).to(x.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            dropped = (x.to(ctx.dtype) * keep).reshape(-1, x.shape[-1])  # (N, in)
            grad_a = (grad_h.reshape(-1, grad_h.shape[-1]).T @ dropped).to(a.dtype)  # (r, in)
        return grad_x, grad_a, None, None, None

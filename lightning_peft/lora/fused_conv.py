r"""A fused LoRA convolution: one pass over the input for the frozen weight and the adapter's ``A``.

HF PEFT (and the plain :class:`~lightning_peft.lora.LoRAConv` path) runs three convolutions per step::

    y = conv(x, W) + s · conv1x1(conv(x, A), B)          # x read twice; backward: two transposed convs

On early CNN layers (few channels, large maps) the ``r``-channel convolution is memory-bound, so it costs
nearly as much as the frozen one. Here the frozen weight and ``A`` are stacked per group into one weight
``[W; A]`` with ``out + r`` output channels::

    [y; h] = conv(x, [W; A])          # one pass over x
    out    = y + s · B h              # one batched matmul (B is a 1x1 conv), fused with the add
    dx     = conv_T([dy; s·Bᵀdy], [W; A])   # one transposed conv gives the input gradient
    dA     = conv_weight_grad(x, s·Bᵀdy)    # the only weight gradient computed: W's is never formed
    dB     = s · Σ dy hᵀ

Outputs and gradients equal the three-convolution path up to float rounding (tests check 1e-5 in fp32).
Without gradients (inference, unmerged) ``conv_path="auto"`` folds the update into the weight instead: one
convolution of ``out`` channels, so unmerged inference costs what the base layer costs.

:class:`~lightning_peft.lora.conv.LoRAConv` decides when this path runs (``conv_path``, in one place:
``LoRAConv.path``); this module only computes it, from plain tensors.
"""

from __future__ import annotations

from typing import Any

import torch

_conv_backward = torch.ops.aten.convolution_backward


def _stack_per_group(weight: torch.Tensor, lora_a: torch.Tensor, groups: int) -> torch.Tensor:
    """``[W; A]`` interleaved per group: group ``j`` gets its ``out/g`` rows of W followed by its ``r/g`` rows of A."""
    rest = weight.shape[1:]
    stacked = torch.cat([weight.reshape(groups, -1, *rest), lora_a.reshape(groups, -1, *rest)], dim=1)
    return stacked.reshape(-1, *rest)


class _FusedLoRAConv(torch.autograd.Function):
    """``conv(x, W, bias) + scale · conv1x1(conv(x, A), B)`` with one forward and one transposed convolution."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
        lora_b: torch.Tensor, scale: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    ) -> torch.Tensor:
        out, r = weight.shape[0], lora_a.shape[0]
        o, rg = out // groups, r // groups
        stacked = _stack_per_group(weight, lora_a, groups)
        stacked_bias = None if bias is None else torch.cat([bias.reshape(groups, o), bias.new_zeros(groups, rg)], 1)
        zeros = [0] * len(stride)
        both = torch.ops.aten.convolution(
            x, stacked, None if stacked_bias is None else stacked_bias.reshape(-1), stride, padding, dilation,
            False, zeros, groups,
        ).contiguous()
        n, spatial = both.shape[0], both.shape[2:]
        per_group = both.view(n * groups, o + rg, -1)  # (N·g, o + r/g, L): rows of y, then rows of h
        hidden = per_group[:, o:]
        b_mat = lora_b.reshape(groups, o, rg)
        b_batched = b_mat.unsqueeze(0).expand(n, groups, o, rg).reshape(n * groups, o, rg)
        # y + s·B h in one pass, written into a tensor of the output's shape: a returned view would forbid the
        # in-place ops that often follow a conv (VGG's and SqueezeNet's ReLU(inplace=True))
        result = both.new_empty(n, out, *spatial)
        torch.baddbmm(per_group[:, :o], b_batched, hidden, alpha=scale, out=result.view(n * groups, o, -1))
        ctx.save_for_backward(x, weight, lora_a, hidden.contiguous(), b_mat)  # parameters, not a stacked copy
        ctx.conv = (stride, padding, dilation, groups)
        ctx.scale, ctx.out = scale, out
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, hidden, b_mat = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        out, scale = ctx.out, ctx.scale
        o, rg = out // groups, b_mat.shape[-1]
        n, spatial = grad.shape[0], grad.shape[2:]
        grad4 = grad.contiguous().view(n, groups, o, -1)
        grad_hidden = torch.matmul(b_mat.transpose(1, 2), grad4).mul_(scale)  # (N, g, r/g, L) = s·Bᵀ dy
        zeros = [0] * len(stride)
        grad_x = grad_a = grad_bias = grad_b = None  # the base weight is frozen (LoRAConv.path checks): no dW
        grad_h = grad_hidden.reshape(n, groups * rg, *spatial)
        if ctx.needs_input_grad[0]:
            stacked = _stack_per_group(weight, lora_a, groups)
            grad_both = torch.cat([grad4, grad_hidden], dim=2).view(n, out + groups * rg, *spatial)
            grad_x = _conv_backward(
                grad_both, x, stacked, None, stride, padding, dilation, False, zeros, groups, [True, False, False]
            )[0]
        if ctx.needs_input_grad[3]:
            grad_a = _conv_backward(
                grad_h, x, lora_a, None, stride, padding, dilation, False, zeros, groups, [False, True, False]
            )[1]
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=[0, *range(2, grad.dim())])
        if ctx.needs_input_grad[4]:
            hidden4 = hidden.view(n, groups, rg, -1)
            grad_b = torch.matmul(grad4, hidden4.transpose(-1, -2)).sum(0).mul_(scale)  # (g, o, r/g) = s·Σ dy hᵀ
            grad_b = grad_b.reshape(out, rg, *([1] * len(spatial)))
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None


def fused_lora_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scale: float, stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> torch.Tensor:
    """``conv(x, W, bias) + scale · conv1x1(conv(x, A), B)`` by one convolution with ``[W; A]`` stacked per group.

    Args:
        x: The input, ``(N, C, *spatial)``, already padded for a non-zero ``padding_mode`` (``padding`` then zero).
        weight: The frozen base weight ``(out, C/groups, *k)``; it gets no gradient.
        bias: The base bias (gets its gradient if it requires one), or ``None``.
        lora_a: ``A``, ``(r, C/groups, *k)``; ``r`` a multiple of ``groups`` (the per-group form).
        lora_b: ``B``, ``(out, r/groups, 1...)``.
        scale: The LoRA scale ``alpha / r``.
        stride: The convolution's stride, padding, dilation and groups, as ``F.conv*d`` takes them.
        padding: See ``stride``.
        dilation: See ``stride``.
        groups: See ``stride``.

    All tensors must share one dtype; autocast is switched off inside (the caller casts first).
    """
    with torch.autocast(x.device.type, enabled=False):
        return _FusedLoRAConv.apply(x, weight, bias, lora_a, lora_b, scale, stride, padding, dilation, groups)

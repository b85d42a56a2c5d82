r"""LoRA for ``nn.Conv1d/2d/3d``, and the one place that decides how a LoRA convolution is computed.

A is a convolution with the base layer's kernel, stride, padding, dilation, padding mode and groups and ``r``
output channels, and B is a grouped 1x1 convolution, so ``B ∘ A`` is exactly a convolution with weight ``ΔW`` and
``merge()`` is exact for every conv (grouped, dilated, strided, circular). A grouped convolution (``groups = g``,
weight ``(out, in/g, *k)``) has two forms (``conv_groups``):

- ``"shared"`` (default, any ``r``): the weight seen as one ``(out, in/g·prod(k))`` matrix gets ``ΔW = B A`` with
  A ``(r, in/g, *k)`` and B ``(out, r, 1...)``, applied as one grouped convolution of the base's shape with
  ``W + s·ΔW`` (its weight is small for depthwise and grouped convs). ``r·in/g·prod(k) + out·r`` parameters.
- ``"per_group"``: each group has its own rank-``r/g`` update (``ΔW`` block-diagonal, A a grouped conv, B a
  grouped 1x1 conv); ``r`` must be a multiple of ``g``. ``r·in/g·prod(k) + out·r/g`` parameters.

Three paths compute the same ``base(x) + s · B A dropout(x)`` (``conv_path``; :meth:`LoRAConv.path` decides):

- ``"adapter"``: the three convolutions, ``conv(x, W) + s · conv1x1(conv(dropout(x), A), B)``;
- ``"folded"``: one convolution ``conv(x, W + s·ΔW)`` (a full-size weight gradient; no input for dropout);
- ``"fused"``: one convolution with ``[W; A]`` stacked per group (:mod:`lightning_peft.lora.fused_conv`; CPU).

``"auto"`` (default) takes the fused path on CPU in training where it pays, the folded one without gradients, on
CUDA and for the shared form, and the adapter path with active dropout or where neither applies. The folded and
fused paths convolve with the raw weight and never call the base layer, so a base that must be called takes the
adapter path: one whose class has a forward of its own (timm's ``ScaledStdConv2d`` standardizes W first), or
that has hooks (``register_forward_pre_hook`` and the like, or a ``forward`` set on the instance as accelerate does).
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from lightning_peft.lora.dropout import dropped_input
from lightning_peft.lora.fused_conv import fused_lora_conv
from lightning_peft.lora.layers import LAYER_NAME, LoRALayer
from lightning_peft.participation import took_part

ConvGroups = Literal["shared", "per_group"]
ConvPath = Literal["auto", "adapter", "folded", "fused"]
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConv(LoRALayer):
    """LoRA for ``nn.Conv1d/2d/3d``: A is a conv like the base one with ``r`` output channels, B a 1x1 conv.

    Args:
        conv_groups: For a grouped base (``groups > 1``): ``"shared"`` (one ``(out, in/g·prod(k))`` low-rank
            update ``B A``, any ``r``) or ``"per_group"`` (a rank-``r/g`` update per group, ``r`` a multiple of
            ``groups``). Both are the same for ``groups == 1``. See the module docstring.
        conv_path: How the adapted convolution is computed: ``"auto"``, ``"adapter"``, ``"folded"`` or ``"fused"``
            (see the module docstring); the same result on every path, up to float rounding.

    Raises:
        ValueError: ``conv_groups="per_group"`` with ``r`` not a multiple of ``groups``; ``conv_path="folded"`` or
            ``"fused"`` with dropout or on a base that must be called (its own forward, hooks); ``"fused"`` on the
            shared grouped form or with ``padding="same"``.
    """

    base_layer: _ConvNd
    formula_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(
        self, base: _ConvNd, r: int, *args: Any, conv_groups: ConvGroups = "shared", conv_path: ConvPath = "auto",
        **kwargs: Any,
    ) -> None:
        if conv_groups == "per_group" and r % base.groups:
            fix = base.groups * max(1, round(r / base.groups))
            raise ValueError(
                f"LoRA rank r={r} is not a multiple of groups={base.groups} of {type(base).__name__}"
                f"({base.in_channels}, {base.out_channels}, groups={base.groups}): with conv_groups='per_group' each "
                f"group needs the same rank. Use conv_groups='shared' (any rank), give this layer a multiple of "
                f"{base.groups} (rank_pattern={{{LAYER_NAME}: {fix}}}), or leave it out with exclude_modules."
            )
        self.__dict__["conv_groups"] = conv_groups  # read by ``groups`` during LoRALayer.__init__
        super().__init__(base, r, *args, **kwargs)
        self.base_computes_itself = self.own_forward  # a fact of the base's class: read on every forward, found once
        self.conv_path = conv_path
        problem = {"folded": self._folded_problem, "fused": self._fused_problem}.get(conv_path, lambda: None)()
        if problem is not None:
            raise ValueError(
                f"conv_path={conv_path!r} cannot run on this {type(base).__name__}: {problem}. "
                "Use conv_path='auto' (picks a path that applies) or 'adapter'."
            )

    @property
    def groups(self) -> int:
        return self.base_layer.groups if self.conv_groups == "per_group" else 1

    @property
    def shared_over_groups(self) -> bool:
        """Whether one ``B A`` is shared by the groups of a grouped base (applied as a conv with ``ΔW``)."""
        return self.groups != self.base_layer.groups

    # --- the path ------------------------------------------------------------------------------------------
    def path(self, x: torch.Tensor) -> Literal["adapter", "folded", "fused"]:
        """The path a call on ``x`` takes now: ``conv_path``, or for ``"auto"`` the measured best that applies.

        Raises:
            ValueError: ``conv_path="fused"`` on an input or a state the fused convolution cannot take (a
                trainable base weight, mixed dtypes, an unbatched input).
        """
        if self.conv_path in ("folded", "fused"):
            problem = self._fused_problem(x) if self.conv_path == "fused" else self._folded_problem()
            if problem is not None:
                raise ValueError(
                    f"conv_path={self.conv_path!r} cannot run this {type(self.base_layer).__name__} now: {problem}."
                )
            return self.conv_path
        if self.conv_path == "adapter" or self._call_problem() is not None:
            return "adapter"
        if self.shared_over_groups or (x.is_cuda and not self.dropout_active):
            # shared form: conv(x, W + s·ΔW), one grouped conv of the base shape (ΔW is as small as W). CUDA: the
            # adapter's r-channel convolutions are launch- and occupancy-bound (ResNet-50, H200, bf16: README)
            return "adapter" if self.dropout_active else "folded"
        if x.device.type != "cpu" or self._fused_problem(x) is not None or not _pays(x, self.base_layer):
            return "adapter"
        needs_grad = x.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad
        if not (torch.is_grad_enabled() and needs_grad):
            return "folded"  # inference: one convolution of out channels
        return "fused"

    def _call_problem(self) -> str | None:
        """Why the base layer must be called itself rather than convolved with its weight, or ``None``."""
        base = self.base_layer
        if self.base_computes_itself:
            return (f"{type(base).__name__} computes through a forward of its own (it may transform the weight, as "
                    "weight standardization does), which one convolution with the raw weight would skip")
        if (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
                or "forward" in vars(base)):
            return "it has hooks (or a forward set on the instance), which run only when the layer is called"
        return None

    def _folded_problem(self) -> str | None:
        if isinstance(self.dropout, nn.Dropout):
            return f"it has no separate adapter input to apply dropout={self.dropout.p} to"
        return self._call_problem()

    def _fused_problem(self, x: torch.Tensor | None = None) -> str | None:
        """Why the fused convolution cannot run (``x=None``: what is known at inject), or ``None``."""
        base = self.base_layer
        if self.shared_over_groups:
            return (f"it stacks [W; A] per group, but conv_groups='shared' gives this grouped conv "
                    f"(groups={base.groups}) one update of the whole weight; use conv_groups='per_group'")
        if _numeric_padding(base) is None:
            return "it needs numeric padding, not padding='same'"
        if x is None:  # at inject
            return self._folded_problem()
        if self.dropout_active:
            return "dropout is active"
        if (problem := self._call_problem()) is not None:
            return problem
        if base.weight.requires_grad:
            return "the base weight is trainable, and the fused backward computes no gradient for it"
        if x.dim() != base.weight.dim():
            return f"the input is unbatched ({x.dim()}-D for a {base.weight.dim() - 2}-D conv)"
        if _compute_dtype(x, self._fused_operands()) is None:
            dtypes = sorted({str(t.dtype) for t in [x, *self._fused_operands()]})
            return f"its operands have different dtypes ({', '.join(dtypes)}) outside autocast"
        return None

    def _fused_operands(self) -> list[torch.Tensor]:
        bias = self.base_layer.bias
        return [self.base_layer.weight, self.lora_A, self.lora_B] + ([] if bias is None else [bias])

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.enabled or self.merged or args or kwargs or self.__dict__.get("row_delta") is not None:
            return super().forward(x, *args, **kwargs)
        path = self.path(x)
        if path == "folded":
            return self.folded_forward(x)
        if path == "fused":
            return self.fused_forward(x)
        return super().forward(x)

    def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, W + scale · B A)``: one convolution of the base shape (the CUDA path of ``"auto"``)."""
        return self.base_layer._conv_forward(x, self.folded_weight(), self.base_layer.bias)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + scale · B A x`` by one convolution with ``[W; A]`` (:mod:`lightning_peft.lora.fused_conv`).

        Only where :meth:`path` allows it (``_fused_problem`` is ``None``).
        """
        took_part(self)
        base = self.base_layer
        dtype = cast(torch.dtype, _compute_dtype(x, self._fused_operands()))  # path() checked: not None
        padding = cast(list[int], _numeric_padding(base))
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = [0] * len(padding)
        bias = None if base.bias is None else base.bias.to(dtype)
        return fused_lora_conv(
            x.to(dtype), base.weight.to(dtype), bias, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scale,
            list(base.stride), padding, list(base.dilation), base.groups,
        )

    # --- shapes --------------------------------------------------------------------------------------------
    def a_shape(self) -> tuple[int, ...]:
        shape = self.weight_shape
        return (self.r, shape[1], *shape[2:])

    def b_shape(self) -> tuple[int, ...]:
        shape = self.weight_shape
        return (shape[0], self.r // self.groups, *([1] * (len(shape) - 2)))

    def lora_delta(self, x: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        conv = self._conv_like_base
        if self.shared_over_groups:  # B A (out, in/g·prod(k)) in the base layout, run as the base's grouped conv
            delta = self.from_matrix(self.lora_B.reshape(-1, self.r) @ self.lora_A.reshape(self.r, -1))
            return dropped_input(x, delta, dropout, conv)
        hidden = dropped_input(x, self.lora_A, dropout, conv)
        return _CONV[self.base_weight.dim() - 2](hidden, self.lora_B, groups=self.groups)

    def _conv_like_base(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` convolved with ``weight`` by the base's stride, padding, dilation, padding mode and groups."""
        return self.base_layer._conv_forward(x, weight, None)

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.base_weight.shape)


def _numeric_padding(conv: _ConvNd) -> list[int] | None:
    padding = conv.padding
    if isinstance(padding, str):
        return [0] * len(conv.kernel_size) if padding == "valid" else None  # "same": the adapter path
    return list(padding)


def _pays(x: torch.Tensor, conv: _ConvNd) -> bool:
    """Whether the output positions outnumber the weight's rows times its kernel size.

    Both fused computations copy a weight-sized tensor per call (``[W; A]`` in training, ``W + s·BA`` without
    gradients) to save passes over activations; that pays when ``N · L_out >= out · prod(k)``: early and
    middle CNN layers, not the last blocks of a small batch (measured: benchmarks/conv_layers.py).
    """
    positions = x.shape[0] * math.prod(x.shape[2:]) // math.prod(conv.stride)
    return positions >= conv.out_channels * math.prod(conv.kernel_size)


def _compute_dtype(x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.dtype | None:
    """The dtype every operand is cast to: autocast's, else the shared dtype; ``None`` when they disagree."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtypes = {x.dtype, *(t.dtype for t in tensors)}
    return x.dtype if len(dtypes) == 1 else None

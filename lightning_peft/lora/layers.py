r"""The LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) for Linear, Conv1d/2d/3d, Embedding,
transformers ``Conv1D`` and ``nn.MultiheadAttention``; :mod:`lightning_peft.lora` selects layers and builds them.

::

    x ──► base layer (frozen W) ────────────────► (+) ──► y       y = W x + s · B A dropout(x)
    └──► dropout ──► A (r × in) ──► B (out × r) ──┘              s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so the adapted model equals the base model at step 0 (paper §4.1).
For a convolution, A is a convolution with the base layer's kernel, stride, padding, dilation, padding mode
and groups and ``r`` output channels, and B is a grouped 1x1 convolution, so ``B ∘ A`` is exactly a
convolution with weight ``ΔW`` and ``merge()`` is exact for every conv (grouped, dilated, strided, circular).
A grouped convolution (``groups = g``, weight ``(out, in/g, *k)``) has two forms (``conv_groups``):

- ``"shared"`` (default, any ``r``): the weight seen as one ``(out, in/g·prod(k))`` matrix gets ``ΔW = B A`` with
  A ``(r, in/g, *k)`` and B ``(out, r, 1...)``, applied as one grouped convolution of the base's shape with
  ``W + s·ΔW`` (its weight is small for depthwise and grouped convs). ``r·in/g·prod(k) + out·r`` parameters.
- ``"per_group"``: each group has its own rank-``r/g`` update (``ΔW`` block-diagonal, A a grouped conv, B a
  grouped 1x1 conv); ``r`` must be a multiple of ``g``. ``r·in/g·prod(k) + out·r/g`` parameters.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, ClassVar, Literal, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from lightning_peft.adapter import Adapter, innermost
from lightning_peft.errors import PEFTWarning
from lightning_peft.fused_conv import fused_lora_conv
from lightning_peft.zero3 import global_shape, is_partitioned

LoRAInit = Literal["default", "gaussian", "pissa"]
ConvGroups = Literal["shared", "per_group"]
LAYER_NAME = "<layer name>"  # placeholder in adapter errors; LoRAConfig.attach puts the real name in


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """The LoRA scaling factor: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski 2023).

    Example:
        >>> lora_scale(16.0, 4, rslora=False), lora_scale(16.0, 4, rslora=True)
        (4.0, 8.0)
    """
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALayer(Adapter):
    """LoRA around one layer: ``y = base(x) + scale · B A dropout(x)``.

    Subclasses say how ``A`` and ``B`` are shaped and applied; merging, initialisation and dtype handling are
    shared. ``lora_A.reshape(r, -1)`` and ``lora_B.reshape(-1, r)`` (per group) multiply to the update in the
    layout of :meth:`weight_matrix`.

    Args:
        base: The layer to adapt; it stays a child named ``base_layer`` and is never modified until ``merge()``
            (``init="pissa"`` excepted: W keeps the residual).
        r: Rank of the update.
        alpha: Scaling numerator (paper §4.1); the update is multiplied by ``alpha / r``.
        dropout: Dropout probability on the adapter's input.
        rslora: Scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal with std ``1/r``, B zero) or
            ``"pissa"`` (A, B from the top-``r`` singular vectors of W, which keeps the residual; Meng et al. 2024;
            with adapters disabled or unloaded without merging, the layer computes with the residual only).
        seed: Seed of this adapter's initialisation (derived from its name, so every process agrees).
        read_directly: The parent reads this layer's ``weight`` itself instead of calling it (Mamba's ``dt_proj``,
            see :mod:`lightning_peft.lora.readers`): ``.weight`` then answers ``W + scale · B A`` while the adapter
            is enabled and unmerged, so the update applies there too (without dropout: a warning says so).

    Raises:
        ValueError: ``init="pissa"`` on a grouped layer, on meta-device weights (PiSSA needs the real weights) or
            with ``r`` above the smaller side of the weight matrix.
    """

    mergeable: ClassVar[bool] = True

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
        init: LoRAInit = "default", seed: int = 0, read_directly: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.r = r
        self.scale = lora_scale(alpha, r, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init = init
        self.seed = seed
        self.pissa_applied = False  # whether W holds the PiSSA residual
        self.read_directly = read_directly
        if read_directly and dropout > 0:
            warnings.warn(
                f"LoRA dropout does not apply where the parent reads this {type(base).__name__}'s weight directly "
                "(it computes with W + scale · B A).", PEFTWarning, stacklevel=2,
            )
        if init == "pissa" and self.groups != 1:
            raise ValueError(
                f"init='pissa' needs an ungrouped layer; {type(base).__name__} has groups={self.groups}. "
                "Leave it out with exclude_modules, or use init='default'."
            )
        if init == "pissa" and (self.base_weight.is_meta or is_partitioned(self.base_weight)):
            where = "on the meta device" if self.base_weight.is_meta else "partitioned by DeepSpeed ZeRO-3"
            raise ValueError(
                f"init='pissa' splits the real weights, but this {type(base).__name__}'s are {where}. "
                "Inject after the pretrained weights are loaded (outside deepspeed.zero.Init), or use init='default'."
            )
        matrix = tuple(self.weight_matrix(self.base_weight).shape) if init == "pissa" else ()
        if matrix and r > min(matrix):
            limit = min(matrix)
            raise ValueError(
                f"init='pissa' with r={r} needs r <= {limit}, the smaller side of this {type(base).__name__}'s "
                f"{matrix} weight matrix (PiSSA takes r singular vectors). "
                f"Lower r, or give this layer a smaller rank (rank_pattern={{{LAYER_NAME}: {limit}}})."
            )
        self._make_factors()
        self.reset_parameters()

    def _make_factors(self) -> None:
        self.lora_A = _factor(self.a_shape(), self.base_weight)
        self.lora_B = _factor(self.b_shape(), self.base_weight)

    # --- what a subclass defines -------------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def weight_shape(self) -> torch.Size:
        """The base weight's full shape (also while DeepSpeed ZeRO-3 holds only a partition of it)."""
        return global_shape(self.base_weight)

    @property
    def groups(self) -> int:
        """Groups of the update: ``B A`` is block-diagonal with this many blocks (convolutions only)."""
        return 1

    def a_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def b_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled) in the base layer's output layout."""
        raise NotImplementedError

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as the ``(out, in)`` matrix that ``B @ A`` updates (a view where possible)."""
        return weight

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: a ``(out, in)`` update in the base weight's layout."""
        return matrix

    # --- shared behaviour ----------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with: ``W + scale · B A`` for a layer its parent reads directly
        (``read_directly``) while the adapter is enabled and unmerged, otherwise the base layer's ``weight``."""
        if self.read_directly and self.enabled and not self.merged:
            return self.folded_weight()
        return cast(torch.Tensor, self.base_layer.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not self.enabled:
            return result
        if x.is_floating_point():  # (token ids of an embedding stay as they are)
            x = self.dropout(x.to(self.lora_A.dtype))
        return torch.add(result, self.lora_delta(x).to(result.dtype), alpha=self.scale)  # scaled in the one add

    def delta_matrix(self) -> torch.Tensor:
        """``scale · B @ A`` as an ``(out, in)`` matrix (block-diagonal per group for grouped layers)."""
        g = self.groups
        a = self.lora_A.reshape(g, self.r // g, -1)  # (groups, r/g, in/g · prod(k))
        b = self.lora_B.reshape(g, -1, self.r // g)  # (groups, out/g, r/g)
        return torch.bmm(b, a).reshape(-1, a.shape[-1]) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The weight update this adapter adds, in the base weight's layout and dtype."""
        return self.from_matrix(self.delta_matrix()).to(self.base_weight.dtype)

    def folded_weight(self) -> torch.Tensor:
        """``W + scale · B A`` in the base weight's layout and dtype, as one batched multiply-add per group."""
        g, weight = self.groups, self.base_weight
        a = self.lora_A.reshape(g, self.r // g, -1).to(weight.dtype)
        b = self.lora_B.reshape(g, -1, self.r // g).to(weight.dtype)
        matrix = self.weight_matrix(weight).reshape(g, b.shape[1], a.shape[-1])
        return self.from_matrix(torch.baddbmm(matrix, b, a, alpha=self.scale).reshape(-1, a.shape[-1]))

    @property
    def dropout_active(self) -> bool:
        """Whether dropout changes the adapter's input now (training, with ``dropout > 0``)."""
        return self.training and isinstance(self.dropout, nn.Dropout)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_weight.sub_(self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Restore identity at init: A random and B zero, or for PiSSA a fresh SVD split of the current weight.

        Does nothing on the meta device; strategies call it again after ``to_empty()``.
        """
        if self.lora_A.is_meta or self.base_weight.is_meta:
            return
        if self.init == "pissa":
            self._pissa_split()
        else:
            _init_pair(self.lora_A, self.lora_B, self.init, self.r, self.seed)

    def _pissa_split(self) -> None:
        # W = U S V^T: scale·B A takes the top-r part, W keeps the residual. A second call folds the current
        # update back first, so the adapted layer's outputs stay the same.
        weight = self.base_weight
        if self.pissa_applied and not self.merged:
            weight.add_(self.delta_weight())
        a, b = pissa_factors(self.weight_matrix(weight).cpu(), self.r, self.scale)
        self.lora_A.copy_(a.reshape(self.lora_A.shape))
        self.lora_B.copy_(b.reshape(self.lora_B.shape))
        weight.sub_(self.delta_weight())
        self.pissa_applied, self.merged = True, False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, init={self.init!r}"


def _factor(shape: tuple[int, ...], weight: torch.Tensor) -> nn.Parameter:
    """An uninitialised LoRA factor on the base weight's device, in its dtype (float32 for integer weights)."""
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))


@torch.no_grad()
def _init_pair(a: torch.Tensor, b: torch.Tensor, init: LoRAInit, r: int, seed: int) -> None:
    """A random (Kaiming-uniform with ``a=sqrt(5)`` as ``nn.Linear``, paper §4.1; or normal, std ``1/r``), B zero."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(a.shape, device="cpu")  # explicit device: also right under a meta-device context
    if init == "gaussian":
        values.normal_(0.0, 1.0 / r, generator=generator)
    else:
        bound = 1.0 / math.sqrt(values[0].numel())
        values.uniform_(-bound, bound, generator=generator)
    a.copy_(values)
    b.zero_()


def pissa_factors(matrix: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, in)`` and ``B (out, r)`` with ``scale · B A`` the top-``r`` SVD part of ``matrix`` (PiSSA).

    Both factors get ``sqrt(S_r / scale)``, as in Meng et al. 2024, §3.
    """
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


class LoRALinear(LoRALayer):
    """LoRA for ``nn.Linear``: A is ``(r, in)``, B is ``(out, r)``.

    The base may be a bitsandbytes 4-bit or 8-bit layer (QLoRA, e.g. Lightning's ``BitsandbytesPrecision``):
    the adapter stays in floating point, and ``merge()`` de-quantizes the layer into a plain ``nn.Linear``
    (a quantized weight cannot hold the exact sum), with a :class:`PEFTWarning`.
    """

    def a_shape(self) -> tuple[int, ...]:
        return (self.r, cast(int, self.base_layer.in_features))

    def b_shape(self) -> tuple[int, ...]:
        return (cast(int, self.base_layer.out_features), self.r)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        if _is_quantized(self.base_layer):
            warnings.warn(
                f"merging LoRA into the quantized {type(self.base_layer).__name__} de-quantizes it: the layer becomes "
                "a plain nn.Linear in its compute dtype (more memory, exact sum).", PEFTWarning, stacklevel=2,
            )
            self.base_layer = _dequantized_linear(self.base_layer)
        super().merge()


def _is_quantized(layer: nn.Module) -> TypeGuard[nn.Linear]:  # bitsandbytes' layers subclass nn.Linear
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _dequantized_linear(layer: nn.Linear) -> nn.Linear:
    import bitsandbytes as bnb

    weight: Any = layer.weight  # bitsandbytes' Params4bit or Int8Params (untyped)
    if isinstance(weight, bnb.nn.Params4bit):
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:  # 8-bit: row-wise int8 values and their scales
        dense = bnb.functional.int8_vectorwise_dequant(weight.CB if weight.CB is not None else weight.data, weight.SCB)
    dtype = getattr(layer, "compute_dtype", None) or (layer.bias.dtype if layer.bias is not None else torch.float32)
    plain = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device=dense.device, dtype=dtype
    )
    plain.weight.data.copy_(dense.reshape(layer.out_features, layer.in_features))
    if layer.bias is not None:
        plain.bias.data.copy_(layer.bias.data)
    plain.requires_grad_(False)
    return plain


class LoRAConv1D(LoRALinear):
    """LoRA for transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``."""

    def a_shape(self) -> tuple[int, ...]:
        return (self.r, self.weight_shape[0])

    def b_shape(self) -> tuple[int, ...]:
        return (self.weight_shape[1], self.r)

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConv(LoRALayer):
    """LoRA for ``nn.Conv1d/2d/3d``: A is a conv like the base one with ``r`` output channels, B a 1x1 conv.

    Args:
        conv_groups: For a grouped base (``groups > 1``): ``"shared"`` (one ``(out, in/g·prod(k))`` low-rank
            update ``B A``, any ``r``) or ``"per_group"`` (a rank-``r/g`` update per group, ``r`` a multiple of
            ``groups``). Both are the same for ``groups == 1``. See the module docstring.
    """

    base_layer: _ConvNd

    def __init__(self, base: _ConvNd, r: int, *args: Any, conv_groups: ConvGroups = "shared", **kwargs: Any) -> None:
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

    @property
    def groups(self) -> int:
        return self.base_layer.groups if self.conv_groups == "per_group" else 1

    @property
    def shared_over_groups(self) -> bool:
        """Whether one ``B A`` is shared by the groups of a grouped base (applied as a conv with ``ΔW``)."""
        return self.groups != self.base_layer.groups

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.enabled or self.merged or args or kwargs:
            return super().forward(x, *args, **kwargs)
        if self.shared_over_groups or (x.is_cuda and not self.dropout_active):
            # shared form: conv(x, W + s·ΔW), one grouped conv of the base shape (ΔW is as small as W); with
            # dropout, base(x) + s·conv(dropout(x), ΔW)
            return super().forward(x) if self.dropout_active else self.folded_forward(x)
        # CPU: one convolution with [W; A] instead of three (lightning_peft.fused_conv); None: the plain path
        fused = fused_lora_conv(self, x)
        return fused if fused is not None else super().forward(x)

    def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, W + scale · B A)``: one convolution of the base shape. The GPU path: there the adapter's
        ``r``-channel convolutions are launch- and occupancy-bound, and a full-size weight gradient is cheaper
        (ResNet-50, H200, bf16: see README "Performance")."""
        return self.base_layer._conv_forward(x, self.folded_weight(), self.base_layer.bias)

    def a_shape(self) -> tuple[int, ...]:
        shape = self.weight_shape
        return (self.r, shape[1], *shape[2:])

    def b_shape(self) -> tuple[int, ...]:
        shape = self.weight_shape
        return (shape[0], self.r // self.groups, *([1] * (len(shape) - 2)))

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_over_groups:  # B A (out, in/g·prod(k)) in the base layout, run as the base's grouped conv
            delta = self.from_matrix(self.lora_B.reshape(-1, self.r) @ self.lora_A.reshape(self.r, -1))
            return self.base_layer._conv_forward(x, delta, None)
        hidden = self.base_layer._conv_forward(x, self.lora_A, None)  # base stride/padding/dilation/mode/groups
        return _CONV[self.base_weight.dim() - 2](hidden, self.lora_B, groups=self.groups)

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.base_weight.shape)


class LoRAEmbedding(LoRALayer):
    """LoRA for ``nn.Embedding``: A is ``(r, num_embeddings)``, B is ``(dim, r)``; A starts at zero, B normal."""

    base_layer: nn.Embedding

    def a_shape(self) -> tuple[int, ...]:
        return (self.r, self.weight_shape[0])

    def b_shape(self) -> tuple[int, ...]:
        return (self.weight_shape[1], self.r)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.base_layer
        # no max_norm: it would renormalise lora_A in place
        rows = F.embedding(x, self.lora_A.T, emb.padding_idx, scale_grad_by_freq=emb.scale_grad_by_freq)
        return rows @ self.lora_B.T

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A zero and B normal (std 1 as ``nn.Embedding``, ``1/r`` for ``"gaussian"``), as HF PEFT; PiSSA as others."""
        if self.init == "pissa" or self.lora_A.is_meta or self.base_weight.is_meta:
            return super().reset_parameters()
        generator = torch.Generator().manual_seed(self.seed)
        std = 1.0 / self.r if self.init == "gaussian" else 1.0
        self.lora_B.copy_(torch.empty(self.lora_B.shape, device="cpu").normal_(0.0, std, generator=generator))
        self.lora_A.zero_()  # the lookup selects columns of A: start A at zero and B random


class LoRAMultiheadAttention(LoRALayer):
    """LoRA for ``nn.MultiheadAttention``: one update for the packed q/k/v projection and one for ``out_proj``.

    The attention runs with folded weights ``W + scale · B A`` (PyTorch's attention takes the projection
    weights as tensors), so merging is exact. Adapter-input dropout does not apply here (a warning says so).
    ``lora_A``/``lora_B`` update ``in_proj_weight``, ``lora_out_A``/``lora_out_B`` update ``out_proj.weight``;
    with ``init="pissa"`` only the first pair is a PiSSA split, the second starts as ``"default"``.
    """

    def __init__(self, base: nn.Module, r: int, *args: Any, **kwargs: Any) -> None:
        mha = innermost(base)  # base may be another adapter around the attention (a prefix)
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (a packed in_proj_weight); got "
                f"embed_dim={mha.embed_dim}, kdim={mha.kdim}, vdim={mha.vdim}. Exclude it with exclude_modules."
            )
        super().__init__(base, r, *args, **kwargs)
        if not isinstance(self.dropout, nn.Identity):
            warnings.warn("LoRA dropout does not apply to nn.MultiheadAttention adapters.", PEFTWarning, stacklevel=2)

    @property
    def mha(self) -> nn.MultiheadAttention:
        """The attention module itself, under any adapter wrapping it."""
        return innermost(self.base_layer)  # type: ignore[return-value]

    def _make_factors(self) -> None:
        super()._make_factors()
        out = self.mha.out_proj.weight
        out_shape = global_shape(out)
        self.lora_out_A = _factor((self.r, out_shape[1]), out)
        self.lora_out_B = _factor((out_shape[0], self.r), out)

    @property
    def base_weight(self) -> torch.Tensor:
        return self.mha.in_proj_weight

    def a_shape(self) -> tuple[int, ...]:
        return (self.r, self.weight_shape[1])

    def b_shape(self) -> tuple[int, ...]:
        return (self.weight_shape[0], self.r)

    def out_delta(self) -> torch.Tensor:
        """``scale · B_out A_out``, the update of ``out_proj.weight``."""
        return (self.lora_out_B @ self.lora_out_A * self.scale).to(self.mha.out_proj.weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or not self.enabled:
            return self.base_layer(*args, **kwargs)
        mha, path = self.mha, "base_layer." * _adapter_depth(self.base_layer)  # path from base_layer to mha
        folded = {f"{path}in_proj_weight": mha.in_proj_weight + self.delta_weight(),
                  f"{path}out_proj.weight": mha.out_proj.weight + self.out_delta()}
        return functional_call(self.base_layer, folded, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.mha.out_proj.weight.add_(self.out_delta())
            super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.mha.out_proj.weight.sub_(self.out_delta())
            super().unmerge()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not self.lora_out_A.is_meta and not self.base_weight.is_meta:
            init: LoRAInit = "gaussian" if self.init == "gaussian" else "default"
            _init_pair(self.lora_out_A, self.lora_out_B, init, self.r, self.seed + 1)


def _adapter_depth(module: nn.Module) -> int:
    depth = 0
    while isinstance(module, Adapter):
        module, depth = module.unwrap(), depth + 1
    return depth

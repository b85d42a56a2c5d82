r"""The LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685): the shared base :class:`LoRALayer` and
the adapters for Linear, transformers ``Conv1D`` and Embedding; convolutions are in :mod:`lightning_peft.lora.conv`,
``nn.MultiheadAttention`` in :mod:`lightning_peft.lora.attention`; :mod:`lightning_peft.lora` selects layers and
builds them.

::

    x ──► base layer (frozen W) ────────────────► (+) ──► y       y = W x + s · B A dropout(x)
    └──► dropout ──► A (r × in) ──► B (out × r) ──┘              s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so the adapted model equals the base model at step 0 (paper §4.1).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, ClassVar, Literal, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapter import Adapter
from lightning_peft.errors import PEFTWarning
from lightning_peft.methods import LAYER_NAME
from lightning_peft.zero3 import global_shape, is_partitioned

LoRAInit = Literal["default", "gaussian", "pissa"]


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
        self.lora_A = lora_factor(self.a_shape(), self.base_weight)
        self.lora_B = lora_factor(self.b_shape(), self.base_weight)

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
            init_pair(self.lora_A, self.lora_B, self.init, self.r, self.seed)

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


def lora_factor(shape: tuple[int, ...], weight: torch.Tensor) -> nn.Parameter:
    """An uninitialised LoRA factor on the base weight's device, in its dtype (float32 for integer weights)."""
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))


@torch.no_grad()
def init_pair(a: torch.Tensor, b: torch.Tensor, init: LoRAInit, r: int, seed: int) -> None:
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

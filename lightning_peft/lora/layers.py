r"""The LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685): the shared base :class:`LoRALayer` and
the adapters for Linear, transformers ``Conv1D`` and Embedding; convolutions are in :mod:`lightning_peft.lora.conv`,
``nn.MultiheadAttention`` in :mod:`lightning_peft.lora.attention`; :mod:`lightning_peft.lora` selects layers and
builds them::

    x ──► base layer (frozen W) ────────────────► (+) ──► y       y = W x + s · B A dropout(x)
    └──► dropout ──► A (r × in) ──► B (out × r) ──┘              s = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so the adapted model equals the base model at step 0 (paper §4.1).

The base layer computes ``base(x)`` itself, through its own ``forward`` and hooks. A layer whose class has a forward
of its own (timm's ``ScaledStdConv2d`` standardizes W before convolving) may not compute ``W x``, so ``W + ΔW``
would not compute ``base(x) + ΔW x``: LoRA neither merges into it nor computes it from the raw weight
(:attr:`LoRALayer.own_forward`). A parametrized weight (``torch.nn.utils.parametrizations.weight_norm``) is merged
by storing ``W + ΔW`` through the parametrization's ``right_inverse``.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from typing import Any, ClassVar, Literal, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_peft.adapter import Adapter
from lightning_peft.errors import PEFTWarning
from lightning_peft.imported import imported_class
from lightning_peft.lora.dropout import dropped_input
from lightning_peft.methods import LAYER_NAME
from lightning_peft.participation import read_through, took_part
from lightning_peft.targets import transformers_conv1d_type
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
        ValueError: ``init="pissa"`` on a grouped layer, on meta-device weights (PiSSA needs the real weights), with
            ``r`` above the smaller side of the weight matrix, or where W cannot keep the exact residual (a layer with
            a forward of its own, a parametrization without ``right_inverse``).
    """

    mergeable: ClassVar[bool] = True
    reports_participation: ClassVar[bool] = True
    #: The torch layers whose ``forward`` (``W x`` and the like) this adapter's formula assumes; a base whose class
    #: overrides it has an :attr:`own_forward`. Empty: not checked (``nn.MultiheadAttention``).
    formula_types: ClassVar[tuple[type[nn.Module], ...]] = ()

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
        problem = self.weight_problem() if init == "pissa" else None
        if problem is not None:
            raise ValueError(
                f"init='pissa' leaves W the residual of the top-r SVD part, which cannot be exact for this "
                f"{type(base).__name__}: {problem}. Use init='default', or leave the layer out with exclude_modules."
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

    def lora_delta(self, x: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """``B A (m ⊙ x) / (1-dropout)``, unscaled, in the base's output layout (``m``: a fresh mask, or all ones)."""
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
        read_through(self, "weight")
        return cast(torch.Tensor, self.base_layer.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not self.enabled:
            return result
        took_part(self)
        rows = self.__dict__.get("row_delta")  # per-sample adapters: each batch row's own update, already scaled
        delta, scale = (rows(x), 1.0) if rows is not None else (self.dropped_delta(x), self.scale)
        return torch.add(result, delta.to(result.dtype), alpha=scale)  # scaled in the one add

    def dropped_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B A dropout(x)``, unscaled; dropout acts inside A's product, keeping no dropped copy of ``x``
        (:mod:`lightning_peft.lora.dropout`). Token ids, an embedding's input, are not dropped."""
        if not x.is_floating_point():
            return self.lora_delta(x)
        p = cast(nn.Dropout, self.dropout).p if self.dropout_active else 0.0
        return self.lora_delta(x if p else x.to(self.lora_A.dtype), p)  # dropped: x's own storage is what is kept

    def delta_matrix(self) -> torch.Tensor:
        """``scale · B @ A`` as an ``(out, in)`` matrix (block-diagonal per group for grouped layers)."""
        took_part(self)
        g = self.groups
        a = self.lora_A.reshape(g, self.r // g, -1)  # (groups, r/g, in/g · prod(k))
        b = self.lora_B.reshape(g, -1, self.r // g)  # (groups, out/g, r/g)
        return torch.bmm(b, a).reshape(-1, a.shape[-1]) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The weight update this adapter adds, in the base weight's layout and dtype."""
        return self.from_matrix(self.delta_matrix()).to(self.base_weight.dtype)

    def folded_weight(self) -> torch.Tensor:
        """``W + scale · B A`` in the base weight's layout and dtype, as one batched multiply-add per group."""
        took_part(self)
        g, weight = self.groups, self.base_weight
        a = self.lora_A.reshape(g, self.r // g, -1).to(weight.dtype)
        b = self.lora_B.reshape(g, -1, self.r // g).to(weight.dtype)
        matrix = self.weight_matrix(weight).reshape(g, b.shape[1], a.shape[-1])
        return self.from_matrix(torch.baddbmm(matrix, b, a, alpha=self.scale).reshape(-1, a.shape[-1]))

    @property
    def own_forward(self) -> bool:
        """Whether the base layer's class computes through a ``forward`` of its own instead of the torch layer's
        (:attr:`formula_types`; timm's ``Linear`` and Falcon's ``FalconLinear`` compute the same ``x W^T + b``)."""
        forward = type(self.base_layer).forward
        if not self.formula_types or any(forward is t.forward for t in self.formula_types):
            return False
        return not any(forward is t.forward for t in plain_forward_types())

    def weight_problem(self) -> str | None:
        """Why the base weight cannot take a change ``W + ΔW`` that computes ``base(x) + ΔW·x``, or ``None``."""
        base = self.base_layer
        if self.own_forward:
            return (f"{type(base).__name__} computes through a forward of its own, which may transform the weight "
                    "(weight standardization does), so W + ΔW would not compute base(x) + ΔW·x")
        if not self.formula_types:
            return None
        if parametrize.is_parametrized(base, "weight"):
            missing = [type(p).__name__ for p in _parametrizations(base) if not hasattr(p, "right_inverse")]
            if missing:
                return (f"its weight is parametrized by {', '.join(missing)}, which has no right_inverse to store "
                        "W + ΔW through")
        elif "weight" not in base._parameters and "weight" not in base._buffers:
            return ("its weight is not a tensor it stores but one computed on each call (as torch.nn.utils."
                    "weight_norm's hook does), which would overwrite W + ΔW")
        return None

    def merge_problem(self) -> str | None:
        """Why :meth:`merge` would not give the adapted outputs, or ``None``: see :meth:`weight_problem`; a
        parametrization must also represent ``W + ΔW`` (an orthogonal one cannot)."""
        problem = self.weight_problem()
        if problem is None and self._parametrized:
            problem = _storing_problem(self.base_layer, self.base_weight + self.delta_weight())
        return problem

    @property
    def _parametrized(self) -> bool:
        return bool(self.formula_types) and parametrize.is_parametrized(self.base_layer, "weight")

    @property
    def dropout_active(self) -> bool:
        """Whether dropout changes the adapter's input now (training, with ``dropout > 0``)."""
        return self.training and isinstance(self.dropout, nn.Dropout)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scale · B A`` to the base weight.

        Raises:
            TypeError: The base weight cannot take the update exactly (:meth:`merge_problem`); nothing is changed.
        """
        if not self.merged:
            problem = self.merge_problem()
            if problem is not None:
                raise TypeError(
                    f"Cannot merge LoRA into this {type(self.base_layer).__name__}: {problem}. Keep the adapter "
                    "unmerged, or leave the layer out with exclude_modules."
                )
            self._add_to_weight(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-self.delta_weight())
            self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        # a parametrized weight is computed on each read: store W + ΔW through its right_inverse (weight_norm's
        # gives exact g and v) rather than into the computed copy
        if self._parametrized:
            self.base_layer.weight = self.base_weight + delta
        else:
            self.base_weight.add_(delta)

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
        if self.pissa_applied and not self.merged:
            self._add_to_weight(self.delta_weight())
        a, b = pissa_factors(self.weight_matrix(self.base_weight).cpu(), self.r, self.scale)
        self.lora_A.copy_(a.reshape(self.lora_A.shape))
        self.lora_B.copy_(b.reshape(self.lora_B.shape))
        residual = self.base_weight - self.delta_weight()
        problem = _storing_problem(self.base_layer, residual) if self._parametrized else None
        if problem is not None:
            raise ValueError(f"init='pissa' cannot keep the residual in this {type(self.base_layer).__name__}: "
                             f"{problem}. Use init='default', or leave the layer out with exclude_modules.")
        self._add_to_weight(-self.delta_weight())
        self.pissa_applied, self.merged = True, False

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, init={self.init!r}"


def plain_forward_types() -> tuple[type[nn.Module], ...]:
    """Subclasses of torch layers whose own ``forward`` computes the torch layer's formula with the weight as it is
    (timm's ``Linear``: a dtype cast under TorchScript; Falcon's ``FalconLinear``: ``x @ W.T + b``), once imported."""
    found = (imported_class("timm.layers.linear", "Linear"),
             imported_class("transformers.models.falcon.modeling_falcon", "FalconLinear"))
    return tuple(t for t in found if t is not None)


def _parametrizations(layer: nn.Module) -> list[nn.Module]:
    """The parametrizations of ``layer.weight``, first applied first."""
    return list(cast(parametrize.ParametrizationList, cast(nn.ModuleDict, layer.parametrizations)["weight"]))


def _storing_problem(layer: nn.Module, value: torch.Tensor) -> str | None:
    """Why ``layer.weight = value`` would not read back as ``value`` through its parametrization, or ``None``.

    Runs the ``right_inverse`` methods and then the parametrizations on copies (a ``right_inverse`` may keep
    state: the orthogonal one's ``base``), storing nothing.
    """
    chain = [copy.deepcopy(parametrization) for parametrization in _parametrizations(layer)]
    stored: Any = value
    for parametrization in reversed(chain):
        stored = cast(Any, parametrization).right_inverse(stored)  # checked: it has one
    back = chain[0](*stored) if isinstance(stored, (tuple, list)) else chain[0](stored)
    for parametrization in chain[1:]:
        back = parametrization(back)
    error = (back - value).abs().max().item()
    limit = 64 * torch.finfo(value.dtype).eps * value.abs().max().item()
    if error > limit:
        names = ", ".join(type(p).__name__ for p in chain)
        return (f"its weight parametrization ({names}) cannot represent W + ΔW (stored and read back, it is off by "
                f"{error:.3g})")
    return None


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

    formula_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    @property
    def own_forward(self) -> bool:
        return not _is_quantized(self.base_layer) and super().own_forward  # bitsandbytes: W x, de-quantized

    def a_shape(self) -> tuple[int, ...]:
        return (self.r, cast(int, self.base_layer.in_features))

    def b_shape(self) -> tuple[int, ...]:
        return (cast(int, self.base_layer.out_features), self.r)

    def lora_delta(self, x: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        return F.linear(dropped_input(x, self.lora_A, dropout), self.lora_B)

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

    @property
    def own_forward(self) -> bool:
        conv1d = transformers_conv1d_type()  # imported: a Conv1D is being adapted
        return conv1d is not None and type(self.base_layer).forward is not conv1d.forward

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
    formula_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Embedding,)

    def a_shape(self) -> tuple[int, ...]:
        return (self.r, self.weight_shape[0])

    def b_shape(self) -> tuple[int, ...]:
        return (self.weight_shape[1], self.r)

    def lora_delta(self, x: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:  # token ids: never dropped
        emb = self.base_layer  # no max_norm below: it would renormalise lora_A in place
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

r"""DoRA, weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): the adapted weight is split
into a learned magnitude per output unit and a direction that LoRA updates::

    W' = m · (W + s·B A) / ‖W + s·B A‖          ‖·‖ per output unit (a row of the (out, in) weight matrix)

    x ──► base layer (W x + b) ──► − b ──► (+) ──► × g ──► + b ──► y      g = m / ‖W + s·B A‖   (norm detached)
    └──► dropout ──► A ──► B ──► × s ─────┘

so ``y = g · (W x + s · B A dropout(x)) + b``, PEFT's ``(g − 1)·W x + g·s·B A dropout(x)`` added to ``base(x)``
written as one product. ``m`` starts at ``‖W‖`` (B A starts at zero), so the adapted model starts equal to the base.
The norm is a constant for the gradient (paper §4.3, as PEFT does): it is computed under ``no_grad`` from the folded
weight ``W + s·B A`` (one ``(out, in)`` multiply-add, no ``in × in`` identity product as in PEFT), and the backward
keeps one output-sized tensor, ``W x + s · B A dropout(x)``, for the gradient of ``m`` (PEFT keeps two).

"Output unit" follows PEFT: the output features of Linear and transformers ``Conv1D``, the output channels of a
convolution (grouped ones too: the norm of each output channel's own weights), and the embedding dimensions of an
``nn.Embedding`` (its weight matrix is ``(dim, num_embeddings)``). Dropout applies to the LoRA branch's input only;
the ``W x`` term reads ``x`` itself (PEFT, with active dropout, multiplies the dropped ``x`` by ``W`` once more).

Merging writes ``g · (W + s·B A)`` into the base weight and keeps ``g`` to take it out again (``unmerge``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from lightning_peft.lora.conv import LoRAConv
from lightning_peft.lora.layers import (
    LoRAConv1D,
    LoRAEmbedding,
    LoRAInit,
    LoRALayer,
    LoRALinear,
    _is_quantized,
    lora_factor,
)
from lightning_peft.participation import took_part
from lightning_peft.zero3 import gathered


class DoRALayer(LoRALayer):
    """The DoRA part shared by every layer kind: the magnitude ``lora_magnitude`` (one value per output unit), the
    forward, merge and unmerge. Combined with a LoRA layer class (:class:`DoRALinear` and the others).

    Raises:
        ValueError: an option DoRA does not take: ``init="pissa"``, a layer its parent reads directly, a
            bitsandbytes-quantized base, a base with a forward of its own.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: LoRAInit = "default", seed: int = 0, read_directly: bool = False, **kwargs: Any) -> None:
        kind = type(base).__name__
        problem = (
            "init='pissa' (PiSSA changes W; use init='default' or 'gaussian')" if init == "pissa" else
            "a parent that reads this layer's weight directly (its update would have to be folded on every read)"
            if read_directly else
            "a bitsandbytes-quantized base (the weight norm needs the de-quantized weight)" if _is_quantized(base)
            else None
        )
        if problem is not None:
            raise ValueError(f"DoRA (dora=True) does not support {problem}, on this {kind}. Use dora=False there, "
                             "or leave the layer out with exclude_modules.")
        super().__init__(base, r, alpha, dropout, rslora, init, seed, read_directly, **kwargs)
        if self.own_forward:
            raise ValueError(
                f"DoRA (dora=True) rescales W x, but this {kind} computes through a forward of its own (it may "
                "transform the weight). Use dora=False there, or leave the layer out with exclude_modules."
            )
        self._merge_gain: torch.Tensor | None = None  # g of the merged weight, kept to unmerge

    def _make_factors(self) -> None:
        super()._make_factors()
        self.lora_magnitude = lora_factor((self.weight_matrix_rows(),), self.base_weight)

    def weight_matrix_rows(self) -> int:
        """The number of output units: rows of the ``(out, in)`` matrix ``B A`` updates."""
        return int(self.b_shape()[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's identity init, then ``m = ‖W + s·B A‖ = ‖W‖`` per output unit (the model starts equal to the base)."""
        super().reset_parameters()
        if not (self.lora_magnitude.is_meta or self.base_weight.is_meta):
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ‖W + s·B A‖`` of the weights the layer holds now; the first forward checks they are still these."""
        self.lora_magnitude.copy_(self.weight_norm())
        self.__dict__["_magnitude_source"] = self.lora_magnitude.detach().float().cpu().clone()

    @torch.no_grad()
    def _check_magnitude_source(self) -> None:
        """Raise if ``m`` is still the norm set at inject but the base weights changed since (loaded afterwards)."""
        source = self.__dict__.pop("_magnitude_source")
        if not torch.equal(self.lora_magnitude.detach().float().cpu(), source):
            return  # trained or loaded since: the magnitude is the user's
        with gathered([self.base_weight]):
            matrix = self.weight_matrix(self.base_weight).float()
            norm = torch.linalg.vector_norm(matrix, dim=1).to(self.lora_magnitude.dtype).float().cpu()
        if not torch.allclose(norm, source, rtol=1e-2, atol=1e-6 * float(source.abs().max())):
            change = ((norm - source).abs() / source.abs().clamp_min(1e-12)).max().item()
            raise ValueError(
                f"DoRA's magnitude on this {type(self.base_layer).__name__} was set from other weights than it holds "
                f"now (‖W‖ differs by up to {change:.0%}): the base weights changed after the adapter was injected, "
                "e.g. a model built on the meta device and loaded after materializing. Call "
                "lightning_peft.reset_dora_magnitude(model) after loading the base weights, or inject after loading."
            )

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B A‖`` per output unit, without gradient (paper §4.3), in the magnitude's dtype.

        Under DeepSpeed ZeRO-3 the base weight is whole only inside the base layer's own forward: it is gathered here
        (a collective: every rank runs the same forward).
        """
        with gathered([self.base_weight]):
            matrix = self.weight_matrix(self.folded_weight())  # (out, in)
            return torch.linalg.vector_norm(matrix.float(), dim=1).to(self.lora_magnitude.dtype)

    def gain(self) -> torch.Tensor:
        """``g = m / ‖W + s·B A‖``, one value per output unit; a gradient reaches ``m`` only."""
        return self.lora_magnitude / self.weight_norm()

    def output_view(self, values: torch.Tensor) -> torch.Tensor:
        """Per-output-unit ``values`` shaped to broadcast over the layer's output (last axis by default)."""
        return values

    def output_bias(self) -> torch.Tensor | None:
        """The bias the base layer adds (``None`` if it has none), shaped like :meth:`output_view`."""
        bias = getattr(self.base_layer, "bias", None)
        return None if bias is None else self.output_view(cast(torch.Tensor, bias))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.__dict__.get("row_delta") is not None:
            raise ValueError("per-sample adapters do not support DoRA (dora=True): each row would need its own "
                             "weight norm. Run the DoRA adapters one at a time (set_adapter).")
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not self.enabled:
            return result
        took_part(self)
        if not torch.compiler.is_compiling() and "_magnitude_source" in self.__dict__:
            self._check_magnitude_source()  # once: the first forward
        bias = self.output_bias()
        plain = result if bias is None else result - bias.to(result.dtype)  # W x
        adapted = torch.add(plain, self.dropped_delta(x).to(result.dtype), alpha=self.scale)  # W x + s·B A drop(x)
        out = adapted * self.output_view(self.gain().to(result.dtype))  # keeps `adapted` (and g) for m's gradient
        return out if bias is None else out + bias.to(result.dtype)

    # --- merge ---------------------------------------------------------------------------------------------
    def _scaled_rows(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``weight`` (base layout) with each output unit's row multiplied by ``factor``."""
        return self.from_matrix(self.weight_matrix(weight) * factor.to(weight.dtype)[:, None])

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base weight: ``g · (W + s·B A) − W`` (``W`` unmerged)."""
        with torch.no_grad():
            return self._scaled_rows(self.folded_weight(), self.gain()) - self.base_weight

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``g · (W + s·B A)`` into the base weight, keeping ``g`` for :meth:`unmerge`."""
        if not self.merged:
            gain = self.gain()
            super().merge()  # checks merge_problem, adds delta_weight()
            self._merge_gain = gain

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W = W' / g − s·B A`` from the merged weight ``W'`` (up to float rounding)."""
        if self.merged and self._merge_gain is not None:
            merged = self.base_weight
            lora = LoRALayer.delta_weight(self)  # s·B A
            original = self._scaled_rows(merged, 1.0 / self._merge_gain.to(merged.device)) - lora
            self._add_to_weight(original - merged)
            self.merged, self._merge_gain = False, None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoRALinear(DoRALayer, LoRALinear):
    """DoRA for ``nn.Linear``: ``m`` has ``out_features`` values."""


class DoRAConv1D(DoRALayer, LoRAConv1D):
    """DoRA for transformers' ``Conv1D`` (GPT-2; weight stored ``(in, out)``): ``m`` has ``nf`` (output) values."""


class DoRAEmbedding(DoRALayer, LoRAEmbedding):
    """DoRA for ``nn.Embedding``: ``m`` has ``embedding_dim`` values (PEFT's norm over the vocabulary)."""

    def output_bias(self) -> torch.Tensor | None:
        return None


class DoRAConv(DoRALayer, LoRAConv):
    """DoRA for ``nn.Conv1d/2d/3d`` (grouped too): ``m`` has ``out_channels`` values. Computed on the adapter path
    (the base conv is called); ``conv_path`` ``"folded"`` and ``"fused"`` are refused."""

    def __init__(self, base: nn.Module, r: int, *args: Any, conv_path: str = "auto", **kwargs: Any) -> None:
        if conv_path not in ("auto", "adapter"):
            raise ValueError(f"DoRA (dora=True) computes convolutions on the adapter path; conv_path={conv_path!r} is "
                             "not supported with it. Use conv_path='auto' or 'adapter'.")
        super().__init__(base, r, *args, conv_path="adapter", **kwargs)

    def output_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, *([1] * (len(self.weight_shape) - 2)))


DORA_LAYERS: dict[type[LoRALayer], type[DoRALayer]] = {
    LoRALinear: DoRALinear,
    LoRAConv1D: DoRAConv1D,
    LoRAEmbedding: DoRAEmbedding,
    LoRAConv: DoRAConv,
}


def dora_layer_for(adapter: type[LoRALayer], layer: str) -> type[DoRALayer]:
    """The DoRA class of the LoRA adapter class ``adapter`` (the most specific registered one it derives from).

    Raises:
        ValueError: DoRA is not defined for this layer kind (``nn.MultiheadAttention``, user-registered types).
    """
    if issubclass(adapter, DoRALayer):
        return adapter
    for cls in adapter.__mro__:
        if cls in DORA_LAYERS:
            if cls is not adapter and adapter.__dict__.get("lora_delta") is not None:
                break  # a user's subclass with its own formula: we do not know its DoRA
            return DORA_LAYERS[cls]
    raise ValueError(
        f"DoRA (dora=True) is defined for Linear, transformers Conv1D, Embedding and Conv1d/2d/3d; {layer!r} gets a "
        f"{adapter.__name__}. Leave it out with exclude_modules, or use dora=False."
    )


def reset_dora_magnitude(model: nn.Module) -> nn.Module:
    """Set every DoRA magnitude of ``model`` to ``‖W + s·B A‖`` of the weights it holds now; returns ``model``.

    DoRA sets ``m = ‖W‖`` when it is injected (so the model starts equal to its base). Where the base weights are
    loaded only afterwards (a model built on the meta device, materialized, then loaded), call this once they are
    in, before training and before sharding; the first forward otherwise raises, naming this function.
    """
    for module in model.modules():
        if isinstance(module, DoRALayer):
            module.reset_magnitude()
    return model

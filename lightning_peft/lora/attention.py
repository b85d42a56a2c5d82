"""LoRA for ``nn.MultiheadAttention``: the packed q/k/v projection and ``out_proj``, applied as folded weights."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lightning_peft.adapter import Adapter, innermost
from lightning_peft.errors import PEFTWarning
from lightning_peft.lora.layers import LoRAInit, LoRALayer, init_pair, lora_factor
from lightning_peft.zero3 import global_shape


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
        self.lora_out_A = lora_factor((self.r, out_shape[1]), out)
        self.lora_out_B = lora_factor((out_shape[0], self.r), out)

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
            init_pair(self.lora_out_A, self.lora_out_B, init, self.r, self.seed + 1)


def _adapter_depth(module: nn.Module) -> int:
    depth = 0
    while isinstance(module, Adapter):
        module, depth = module.unwrap(), depth + 1
    return depth

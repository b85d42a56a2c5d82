r"""LoRA on parameters a module reads itself: mixture-of-experts weights stored as 3-D tensors (``target_parameters``).

transformers 5 keeps the experts of Mixtral-, Qwen-MoE- and GPT-OSS-like models as one parameter per projection,
``(experts, out, in)`` (or ``(experts, in, out)`` where the module says ``is_transposed``), read by the experts
module's own forward (a loop, grouped GEMMs or a kernel), not by an ``nn.Linear``. Each expert ``e`` gets its own
low-rank update, and the module runs with the updated tensor::

    W'[e] = W[e] + s · B[e] A[e]        A (experts, r, in),  B (experts, out, r),  s = alpha / r

The forward hands ``W'`` to the module in place of ``W`` (``torch.func.functional_call``), so every path the module
takes reads the adapted weight; ``merge()`` adds the same update to ``W`` exactly. A 2-D parameter is one
``(out, in)`` matrix. B starts at zero: the adapted model equals the base at step 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch.func import functional_call

from lightning_peft.adapter import Adapter
from lightning_peft.lora.layers import LoRAInit, lora_scale
from lightning_peft.methods import LAYER_NAME, init_seed
from lightning_peft.participation import took_part
from lightning_peft.zero3 import global_shape


class LoRAParameters(Adapter):
    """LoRA on named parameters of one module (``base_layer``): per expert ``W[e] + scale · B[e] A[e]``.

    Args:
        base: The module that holds the parameters and reads them in its forward.
        names: Local names of the parameters to adapt (2-D or 3-D).
        r: Rank of each expert's update.
        alpha: Scaling numerator; updates are multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        rslora: Rank-stabilised scaling.
        init: ``"default"`` (A Kaiming-uniform, B zero) or ``"gaussian"`` (A normal with std ``1/r``, B zero).
        seed: Seed of the initialisation; each parameter derives its own from its name.

    Raises:
        ValueError: A parameter is not 2-D or 3-D, or ``init="pissa"``.
    """

    mergeable: ClassVar[bool] = True
    reports_participation: ClassVar[bool] = True

    def __init__(self, base: nn.Module, names: list[str], r: int, alpha: float, rslora: bool = False,
                 init: LoRAInit = "default", seed: int = 0) -> None:
        super().__init__()
        if init == "pissa":
            raise ValueError("init='pissa' is not available for target_parameters (it splits one weight matrix); use "
                             f"init='default', or give {LAYER_NAME} a LoRA of its own.")
        self.base_layer = base
        self.r, self.scale, self.init, self.seed = r, lora_scale(alpha, r, rslora), init, seed
        self.transposed = bool(getattr(base, "is_transposed", False))  # transformers' (experts, in, out) layout
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in names:
            experts, out, fan_in = self.expert_shape(name)
            weight = self.parameter(name)
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            self.lora_A[name] = nn.Parameter(torch.empty(experts, r, fan_in, device=weight.device, dtype=dtype))
            self.lora_B[name] = nn.Parameter(torch.empty(experts, out, r, device=weight.device, dtype=dtype))
        self.reset_parameters()

    def parameter(self, name: str) -> torch.Tensor:
        """The base module's parameter ``name`` (as it is now: merged, if the adapter is)."""
        return cast(torch.Tensor, self.base_layer._parameters[name])

    def expert_shape(self, name: str) -> tuple[int, int, int]:
        """``(experts, out, in)`` of the parameter ``name``; a 2-D ``(out, in)`` parameter is one expert."""
        shape = global_shape(self.parameter(name))
        if len(shape) == 2:
            return 1, shape[0], shape[1]
        if len(shape) == 3:
            return (shape[0], shape[2], shape[1]) if self.transposed else (shape[0], shape[1], shape[2])
        raise ValueError(f"target_parameters adapts 2-D and 3-D weights; {type(self.base_layer).__name__}.{name} has "
                         f"shape {list(shape)}. Leave it out of target_parameters.")

    def delta(self, name: str) -> torch.Tensor:
        """``scale · B A`` for every expert, in the parameter's layout and dtype."""
        weight = self.parameter(name)
        update = torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scale  # (experts, out, in)
        if self.transposed and weight.dim() == 3:
            update = update.transpose(1, 2)
        return (update[0] if weight.dim() == 2 else update).to(weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or not self.enabled:
            return self.base_layer(*args, **kwargs)
        adapted = {name: self.parameter(name) + self.delta(name) for name in self.lora_A}
        took_part(self)
        return functional_call(self.base_layer, adapted, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name in self.lora_A:
                self.parameter(name).add_(self.delta(name))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name in self.lora_A:
                self.parameter(name).sub_(self.delta(name))
            self.merged = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random (as :class:`~lightning_peft.lora.LoRALinear`, per expert), B zero: identity at init."""
        for name, a in self.lora_A.items():
            if a.is_meta:
                continue
            generator = torch.Generator().manual_seed(init_seed(self.seed, name))
            values = torch.empty(a.shape)
            if self.init == "gaussian":
                values.normal_(0.0, 1.0 / self.r, generator=generator)
            else:
                bound = 1.0 / math.sqrt(a.shape[-1])
                values.uniform_(-bound, bound, generator=generator)
            a.copy_(values)
            self.lora_B[name].zero_()

    def extra_repr(self) -> str:
        return f"parameters={list(self.lora_A)}, r={self.r}, scale={self.scale:g}"

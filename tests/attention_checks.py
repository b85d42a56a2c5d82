"""Helpers shared by the prefix-attention tests: what a module received and returned, and RoPE's rotation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def capture(module: nn.Module) -> dict[str, Any]:
    """The arguments the model passes to ``module`` and its output, on its latest call (``args``, ``kwargs``,
    ``output``). Hook the base layer inside an adapter to see what the adapter hands it."""
    seen: dict[str, Any] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        seen.update(args=args, kwargs=kwargs, output=output)

    module.register_forward_hook(hook, with_kwargs=True)
    return seen


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the last axis: ``[x1, x2] -> [-x2, x1]``."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

"""What every prompt adapter shares: the marker base class and the small tensor helpers."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lightning_peft.adapter import Adapter


class PromptAdapter(Adapter):
    """Base of the prompt adapters (token, patch-token and pixel prompts).

    A prompt adapter wraps the module where its prompt enters the model (the input embedding, a transformer
    block, the image stem) as ``base_layer``; :func:`~lightning_peft.core.unload` puts that module back.
    Prompts change activations, not weights, so they are never mergeable.
    """

    reports_participation: ClassVar[bool] = True

    def __init__(self, base: nn.Module, seed: int) -> None:
        super().__init__()
        self.base_layer = base
        self.seed = seed

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with this adapter's seed: the same values in every process and every reset."""
        return torch.Generator().manual_seed(self.seed)

    def new_parameter(self, *shape: int, like: torch.Tensor | None = None) -> nn.Parameter:
        """An uninitialised parameter on ``like``'s device, in its dtype when that is floating point."""
        device = like.device if like is not None else None
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


def is_prompted(model: nn.Module) -> list[str]:
    """Names of the prompt adapters already in ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, PromptAdapter)]


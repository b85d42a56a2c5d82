r"""Pixel prompts (visual prompting, Bahng et al. 2022, https://arxiv.org/abs/2203.17274) for any image model.

::

    image (B, C, H, W) ──(+)──► first layer (conv stem / patch embedding) ──► rest of the model
                          ▲
          learned border of width w          ┌─────────────┐   "border": 2·w·(H + W - 2·w)·C values
          (zero inside), or a full image     │ ░░░░░░░░░░░ │   "full":   H·W·C values
                                             │ ░░       ░░ │
                                             │ ░░░░░░░░░░░ │
                                             └─────────────┘

The prompt is added to the image, so the input size the model sees does not change. It starts at zero: the
prompted model equals the frozen model before training. The adapter wraps the module that first receives
the image (by default the model's first ``nn.Conv2d``), so it works for ResNets, ViTs and any CNN.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_peft.core import init_seed, replace_module
from lightning_peft.errors import PEFTWarning
from lightning_peft.prompt.base import PromptAdapter

if TYPE_CHECKING:
    from lightning_peft.prompt.config import PromptTuningConfig


class PixelPrompt(PromptAdapter):
    """A learned additive pattern on the image entering ``base``.

    Args:
        base: The module that receives the image ``(B, C, H, W)`` first.
        channels: Image channels ``C``.
        size: Image height and width ``(H, W)`` the prompt is made for.
        width: Border width ``w`` in pixels (``region="border"``).
        region: ``"border"`` (a frame of width ``w``, zero inside) or ``"full"`` (every pixel).
        seed: Seed of the adapter (the prompt starts at zero; kept for a uniform adapter interface).
    """

    def __init__(
        self, base: nn.Module, channels: int, size: tuple[int, int], width: int, region: str, seed: int
    ) -> None:
        super().__init__(base, seed)
        (h, w), b = size, width
        if region == "border" and 2 * b >= min(h, w):
            raise ValueError(
                f"a pixel prompt border of width {b} leaves nothing inside a {h}x{w} image; pass a width below "
                f"{(min(h, w) + 1) // 2}, or region='full' to prompt every pixel."
            )
        self.size, self.width, self.region = (h, w), b, region
        like = next(base.parameters(), None)
        if region == "full":
            self.prompt = self.new_parameter(channels, h, w, like=like)
        else:  # Bahng et al.'s layout: full-width strips top and bottom, shorter strips left and right
            self.prompt_top = self.new_parameter(channels, b, w, like=like)
            self.prompt_bottom = self.new_parameter(channels, b, w, like=like)
            self.prompt_left = self.new_parameter(channels, h - 2 * b, b, like=like)
            self.prompt_right = self.new_parameter(channels, h - 2 * b, b, like=like)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for _, param in self.named_parameters(recurse=False):
            if not param.is_meta:
                param.zero_()  # identity at init: the image is unchanged until training moves the prompt

    def pattern(self) -> torch.Tensor:
        """The prompt as one ``(C, H, W)`` image."""
        if self.region == "full":
            return self.prompt
        h, w, b = *self.size, self.width
        inside = self.prompt_left.new_zeros(self.prompt_left.shape[0], h - 2 * b, w - 2 * b)
        middle = torch.cat([self.prompt_left, inside, self.prompt_right], dim=2)  # (C, H - 2b, W)
        return torch.cat([self.prompt_top, middle, self.prompt_bottom], dim=1)  # (C, H, W)

    def forward(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.enabled:
            if tuple(image.shape[-2:]) != self.size:
                raise ValueError(
                    f"the pixel prompt was made for {self.size[0]}x{self.size[1]} images; got an input of shape "
                    f"{tuple(image.shape)}. Resize the images, or inject with image_size={list(image.shape[-2:])}."
                )
            image = image + self.pattern().to(image.dtype)
        return self.base_layer(image, *args, **kwargs)


DEFAULT_IMAGE_SIZE = 224  # the input size pixel prompts assume for models that declare none


def declared_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model declares (torchvision ``image_size``, timm ``img_size``, transformers config)."""
    for module in model.modules():
        for value in (getattr(module, "image_size", None), getattr(module, "img_size", None),
                      getattr(getattr(module, "config", None), "image_size", None)):
            if isinstance(value, int):
                return value, value
            if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
                return int(value[0]), int(value[1])
    return None


def image_inputs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Candidates for the module that first receives the image: the ``nn.Conv2d`` layers, in order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def attach_pixels(model: nn.Module, config: PromptTuningConfig) -> None:
    """Wrap the image's first module (``image_module`` or the first ``nn.Conv2d``) in a :class:`PixelPrompt`."""
    if config.image_module is not None:
        try:
            name, module = config.image_module, model.get_submodule(config.image_module)
        except AttributeError:
            convs = [n for n, _ in image_inputs(model)][:8]
            raise ValueError(
                f"image_module={config.image_module!r} is not a module of {type(model).__name__}; "
                f"its Conv2d layers are {convs or 'none'}."
            ) from None
    else:
        candidates = image_inputs(model)
        if not candidates:
            raise ValueError(
                f"pixel prompts found no nn.Conv2d in {type(model).__name__} to take the image; pass image_module="
                "'<name of the module that first receives the image>'."
            )
        name, module = candidates[0]
    size = config.image_size or declared_image_size(model)
    if size is None:  # Bahng et al. (2022) prompt 224x224 inputs; a border's parameters depend on the size
        size = DEFAULT_IMAGE_SIZE
        warnings.warn(
            f"{type(model).__name__} declares no input size: the pixel prompt is made for {size}x{size} images (as in "
            "Bahng et al. 2022). Pass image_size=[height, width] to PromptTuning for other sizes.",
            PEFTWarning, stacklevel=2,
        )
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    channels = getattr(module, "in_channels", 3)
    adapter = PixelPrompt(module, channels, hw, config.width, config.pixel_region, init_seed(config.seed, name))
    replace_module(model, name, adapter)

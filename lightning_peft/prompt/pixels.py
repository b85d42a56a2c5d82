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
prompted model equals the frozen model before training.

Any input size: when neither ``image_size`` nor the model fixes the size (a ResNet takes any size), the border is
learned at a reference size (224x224, Bahng et al.'s) and each strip is resized *along its edge only*
(linear interpolation, corners aligned) to the input's height and width, so every input gets a border of
exactly ``w`` pixels, the number of parameters does not depend on the input, and batches of different sizes
share one prompt.
At the reference size the resize is the identity. A ``"full"`` prompt is resized bilinearly.

The adapter wraps the module that first receives
the image (by default the model's first ``nn.Conv2d``), so it works for ResNets, ViTs and any CNN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from lightning_peft.adapter import Adapter
from lightning_peft.participation import took_part
from lightning_peft.prompt.base import PromptAdapter


class PixelPrompt(PromptAdapter):
    """A learned additive pattern on the image entering ``base``.

    Args:
        base: The module that receives the image ``(B, C, H, W)`` first.
        channels: Image channels ``C``.
        size: Image height and width ``(H, W)`` the prompt is made for.
        width: Border width ``w`` in pixels (``region="border"``).
        region: ``"border"`` (a frame of width ``w``, zero inside) or ``"full"`` (every pixel).
        seed: Seed of the adapter (the prompt starts at zero; kept for a uniform adapter interface).
        any_size: Accept inputs of any size, resizing the prompt learned at ``size`` along the edges (see the
            module docstring); ``False`` refuses inputs of another size.
    """

    def __init__(
        self, base: nn.Module, channels: int, size: tuple[int, int], width: int, region: str, seed: int,
        any_size: bool = False,
    ) -> None:
        super().__init__(base, seed)
        (h, w), b = size, width
        if region == "border" and 2 * b >= min(h, w):
            raise ValueError(
                f"a pixel prompt border of width {b} leaves nothing inside a {h}x{w} image; pass a width below "
                f"{(min(h, w) + 1) // 2}, or region='full' to prompt every pixel."
            )
        self.size, self.width, self.region, self.any_size = (h, w), b, region, any_size
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

    def pattern(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The prompt as one ``(C, H, W)`` image, at ``size`` (default: the size it was made for)."""
        h, w = size or self.size
        if self.region == "full":
            if (h, w) == self.size:
                return self.prompt
            return functional.interpolate(self.prompt[None], size=(h, w), mode="bilinear", align_corners=True)[0]
        b = self.width
        if 2 * b >= min(h, w):
            raise ValueError(
                f"a pixel prompt border of width {b} leaves nothing inside a {h}x{w} input; use inputs larger than "
                f"{2 * b}x{2 * b}, or inject with a width below {(min(h, w) + 1) // 2} or region='full'."
            )
        top, bottom = along_edge(self.prompt_top, w, dim=2), along_edge(self.prompt_bottom, w, dim=2)
        left, right = along_edge(self.prompt_left, h - 2 * b, dim=1), along_edge(self.prompt_right, h - 2 * b, dim=1)
        inside = left.new_zeros(left.shape[0], h - 2 * b, w - 2 * b)
        middle = torch.cat([left, inside, right], dim=2)  # (C, H - 2b, W)
        return torch.cat([top, middle, bottom], dim=1)  # (C, H, W)

    def forward(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.enabled:
            took_part(self)
            size = (int(image.shape[-2]), int(image.shape[-1]))
            if self.any_size:
                return self.base_layer(image + self.pattern(size).to(image.dtype), *args, **kwargs)
            if size != self.size:
                raise ValueError(
                    f"the pixel prompt was made for {self.size[0]}x{self.size[1]} images; got an input of shape "
                    f"{tuple(image.shape)}. Resize the images, or inject with image_size={list(image.shape[-2:])}."
                )
            image = image + self.pattern().to(image.dtype)
        return self.base_layer(image, *args, **kwargs)


def along_edge(strip: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``strip`` (C, a, b) linearly resized to ``length`` along ``dim`` (1 or 2) only; unchanged at its own length."""
    if strip.shape[dim] == length:
        return strip
    rows = strip.transpose(1, 2) if dim == 1 else strip  # (C, across, along)
    c, across, along = rows.shape
    if along == 1:
        resized = rows.expand(c, across, length)
    else:
        resized = functional.interpolate(rows.reshape(1, c * across, along), size=length, mode="linear",
                                         align_corners=True).reshape(c, across, length)
    return resized.transpose(1, 2) if dim == 1 else resized


DEFAULT_IMAGE_SIZE = 224  # the reference size of pixel prompts on models that fix no input size


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


@dataclass(frozen=True)
class PixelPlacement:
    """The size a pixel prompt is learned at, and whether inputs of other sizes are resized to."""

    size: tuple[int, int]
    any_size: bool


def image_module(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """The module that first receives the image: ``name`` (``image_module=``) or the first ``nn.Conv2d``.

    Raises:
        ValueError: ``name`` is not a module of ``model``, or the model has no ``nn.Conv2d``.
    """
    if name is not None:
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            convs = [n for n, _ in image_inputs(model)][:8]
            raise ValueError(
                f"image_module={name!r} is not a module of {type(model).__name__}; its Conv2d layers are "
                f"{convs or 'none'}."
            ) from None
    candidates = image_inputs(model)
    if not candidates:
        raise ValueError(
            f"pixel prompts found no nn.Conv2d in {type(model).__name__} to take the image; pass image_module="
            "'<name of the module that first receives the image>'."
        )
    return outermost(model, candidates[0][0])


def outermost(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The module at ``name``'s place in ``model`` with every adapter around it: a conv that LoRA wraps is reached
    as ``stem.base_layer``, and the image must enter at ``stem``, so the prompt reaches LoRA's own input too (the
    same model whichever method is injected first)."""
    while name.endswith(".base_layer") and isinstance(model.get_submodule(name[: -len(".base_layer")]), Adapter):
        name = name[: -len(".base_layer")]
    return name, model.get_submodule(name)


def pixel_placement(model: nn.Module, image_size: int | list[int] | None) -> PixelPlacement:
    """``image_size``, else the size the model declares; a model that declares none takes any size (a ResNet): its
    prompt is learned at :data:`DEFAULT_IMAGE_SIZE` and resized along the edges to each input."""
    size = image_size or declared_image_size(model)
    if size is None:
        return PixelPlacement((DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE), any_size=True)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return PixelPlacement(hw, any_size=False)

r"""Patch-token prompts (VPT, Jia et al. 2022, https://arxiv.org/abs/2203.12119) for vision transformers.

::

    [cls | patches] + pos ──► block 0 ──► block 1 ──► … ──► block L-1 ──► norm / head
    shallow:  [cls | P | patches] enters block 0; the P outputs flow on through every block
    deep:     block i > 0 gets fresh prompts P_i in place of the previous block's prompt outputs

Prompts sit after the class (and register) tokens and after the position embeddings, so they have no
position. After the last block they are removed again (unless ``keep_virtual_outputs``): the sequence that
reaches the final norm, the pooling and the head has the original length, the class token keeps index 0 and
average pooling sees patches only.

Each adapter wraps one transformer block; ViT families are found by small locator functions (torchvision,
timm, transformers), and :func:`register_vit_locator` adds one for another family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.imported import imported_class
from lightning_peft.participation import took_part
from lightning_peft.prompt.base import PromptAdapter
from lightning_peft.targets import is_inside


@dataclass(frozen=True)
class VitSite:
    """Where patch prompts go in one vision transformer.

    Attributes:
        blocks: Full names of the transformer blocks, in order.
        prefix_tokens: Tokens before the patches (class token, register tokens); prompts go after them.
        dim: Token width.
        patch_fan_in: Inputs of one patch embedding (channels x patch height x patch width), for VPT's init.
    """

    blocks: list[str]
    prefix_tokens: int
    dim: int
    patch_fan_in: int


VitLocator = Callable[[str, nn.Module], "VitSite | None"]


def _block_names(name: str, path: str, container: nn.Module) -> list[str]:
    return [f"{name}.{path}.{child}".lstrip(".") for child, _ in container.named_children()]


def _torchvision_vit(name: str, module: nn.Module) -> VitSite | None:
    vit = imported_class("torchvision.models.vision_transformer", "VisionTransformer")
    if vit is None or not isinstance(module, vit):
        return None
    blocks = _block_names(name, "encoder.layers", module.encoder.layers)  # named encoder_layer_0, ...
    return VitSite(blocks, 1, module.hidden_dim, module.conv_proj.weight[0].numel())


def _timm_vit(name: str, module: nn.Module) -> VitSite | None:
    vit = imported_class("timm.models.vision_transformer", "VisionTransformer")
    if vit is None or not isinstance(module, vit):
        return None
    blocks = _block_names(name, "blocks", module.blocks)
    return VitSite(blocks, module.num_prefix_tokens, module.embed_dim, module.patch_embed.proj.weight[0].numel())


def _transformers_vit(name: str, module: nn.Module) -> VitSite | None:
    vit = imported_class("transformers.models.vit.modeling_vit", "ViTModel")
    if vit is None or not isinstance(module, vit):
        return None
    path = "layers" if hasattr(module, "layers") else "encoder.layer"  # transformers >= 5.x : 4.x
    blocks = _block_names(name, path, module.get_submodule(path))
    fan_in = module.embeddings.patch_embeddings.projection.weight[0].numel()
    return VitSite(blocks, 1, module.config.hidden_size, fan_in)


_LOCATORS: list[VitLocator] = [_torchvision_vit, _timm_vit, _transformers_vit]


def register_vit_locator(locator: VitLocator) -> VitLocator:
    """Teach patch prompts another ViT family: ``locator(name, module)`` returns a :class:`VitSite` or ``None``.

    Locators are asked newest first, before the built-in ones; the first answer wins (as for
    ``register_lora_layer`` and ``register_attention_handler``).

    Returns:
        ``locator``, so this also works as a decorator.
    """
    _LOCATORS.insert(0, locator)
    return locator


def find_vits(model: nn.Module) -> list[VitSite]:
    """Every vision transformer in ``model`` a locator recognises (outermost first, nested ones skipped)."""
    sites: list[VitSite] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if is_inside(name, taken):
            continue
        site = next((s for locate in _LOCATORS if (s := locate(name, module)) is not None), None)
        if site is not None:
            sites.append(site)
            taken.append(name)
    return sites


class PatchPrompt(PromptAdapter):
    """One transformer block with VPT prompts around it.

    Args:
        block: The transformer block; its first input is the token sequence ``(B, L, d)``.
        num_tokens: Number of prompt tokens ``p``.
        dim: Token width ``d``.
        start: Index where prompts sit (after the class and register tokens).
        mode: ``"insert"`` (first block: add ``p`` tokens), ``"replace"`` (deep: overwrite the previous prompts)
            or ``"pass"`` (no prompt of its own; only removes them after the last block).
        remove_after: Take the ``p`` prompt outputs out of the block's output (last block).
        patch_fan_in: Inputs of one patch embedding; prompts start uniform in ``±sqrt(6 / (fan_in + d))`` (VPT's
            Xavier init).
        seed: Seed of the initialisation.
    """

    def __init__(
        self, block: nn.Module, num_tokens: int, dim: int, start: int, mode: str, remove_after: bool,
        patch_fan_in: int, seed: int,
    ) -> None:
        super().__init__(block, seed)
        self.num_tokens, self.start, self.mode, self.remove_after = num_tokens, start, mode, remove_after
        self.bound = math.sqrt(6.0 / (patch_fan_in + dim))
        like = next(block.parameters(), None)
        self.prompt = self.new_parameter(num_tokens, dim, like=like) if mode != "pass" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.prompt is None or self.prompt.is_meta:
            return
        values = torch.rand(self.prompt.shape, generator=self.generator()) * 2 * self.bound - self.bound
        self.prompt.copy_(values)

    def forward(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base_layer(tokens, *args, **kwargs)
        took_part(self)  # a block that only passes or removes prompt tokens takes part by doing that
        s, p = self.start, self.num_tokens
        if self.prompt is not None:
            prompt = self.prompt.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
            rest = tokens[:, s:] if self.mode == "insert" else tokens[:, s + p:]
            tokens = torch.cat([tokens[:, :s], prompt, rest], dim=1)  # (B, s + p + patches, d)
        output = self.base_layer(tokens, *args, **kwargs)
        if not self.remove_after:
            return output
        if isinstance(output, tuple):
            return (torch.cat([output[0][:, :s], output[0][:, s + p:]], dim=1), *output[1:])
        return torch.cat([output[:, :s], output[:, s + p:]], dim=1)


@dataclass(frozen=True)
class PatchPlacement:
    """What the patch prompt at one block of a ViT does (see :class:`PatchPrompt`)."""

    vit: VitSite
    mode: str  # "insert" (first block), "replace" (deep prompts) or "pass"
    remove: bool  # the last block takes the prompt tokens out again


def patch_placements(model: nn.Module, deep: bool, keep_virtual_outputs: bool) -> list[tuple[str, PatchPlacement]]:
    """``(block name, placement)`` for the blocks of every ViT in ``model`` that get a patch prompt adapter: the first
    block, every block with ``deep``, and the last when the prompt tokens are taken out of the outputs."""
    placements = []
    for vit in find_vits(model):
        last = len(vit.blocks) - 1
        for i, name in enumerate(vit.blocks):
            mode = "insert" if i == 0 else "replace" if deep else "pass"
            remove = i == last and not keep_virtual_outputs
            if mode != "pass" or remove:
                placements.append((name, PatchPlacement(vit, mode, remove)))
    return placements

"""Soft prompts for any model: token prompts for language models, patch-token prompts for vision
transformers (VPT), pixel prompts for image models.

One configuration, :class:`PromptTuningConfig` (the callback ``PromptTuning`` takes the same arguments),
picks the kind from the model (or ``kind=...``) and attaches one adapter family:

* :mod:`~lightning_peft.prompt.tokens`: ``p`` learned embeddings before the input tokens;
* :mod:`~lightning_peft.prompt.patches`: ``p`` learned tokens after a ViT's class token (shallow or deep);
* :mod:`~lightning_peft.prompt.pixels`: a learned border (or full image) added to the input image.
"""

from lightning_peft.prompt.base import PromptAdapter
from lightning_peft.prompt.config import PromptTuningConfig, detect_kind
from lightning_peft.prompt.patches import PatchPrompt, VitSite, register_vit_locator
from lightning_peft.prompt.pixels import PixelPrompt
from lightning_peft.prompt.tokens import TokenPrompt

__all__ = [
    "PatchPrompt",
    "PixelPrompt",
    "PromptAdapter",
    "PromptTuningConfig",
    "TokenPrompt",
    "VitSite",
    "detect_kind",
    "register_vit_locator",
]

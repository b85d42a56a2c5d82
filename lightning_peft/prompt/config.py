"""Configuration of soft prompts, and the choice of prompt kind for a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from torch import nn

from lightning_peft.methods import MethodConfig, Site, check_choice, check_positive_int
from lightning_peft.prompt.base import PromptAdapter, is_prompted
from lightning_peft.prompt.patches import PatchPlacement, PatchPrompt, find_vits, patch_placements
from lightning_peft.prompt.pixels import PixelPlacement, PixelPrompt, image_inputs, image_module, pixel_placement
from lightning_peft.prompt.tokens import (
    TokenPrompt,
    hook_into_transformers,
    host_embedding,
    init_ids,
    named_embedding,
    token_hosts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PromptKind = Literal["tokens", "patches", "pixels"]
PromptInit = Literal["random", "vocab", "text"]
Truncation = Literal["left", "right"]
PixelRegion = Literal["border", "full"]


@dataclass(eq=False)
class PromptTuningConfig(MethodConfig):
    """Configuration of soft prompts; ``PromptTuning`` (the callback) takes the same arguments.

    Args:
        num_tokens: Number of prompt tokens (text and ViT prompts). Lester et al. 2021 §3 use 1-150; 20 is a
            common default; VPT (Jia et al. 2022) uses 1-200 per block.
        init: Token prompts start as ``"random"`` vectors (normal, with the spread of the embedding's weights),
            the embeddings of ``"vocab"`` rows drawn with ``seed``, or the embeddings of ``"text"``
            (``init_text``, repeated or cut to ``num_tokens``). Patch prompts always start uniform (VPT's
            Xavier init), pixel prompts at zero.
        init_text: The text whose token embeddings start the prompt (``init="text"``).
        tokenizer: Path or name of the tokenizer for ``init_text`` (read with ``AutoTokenizer.from_pretrained``).
        kind: ``"tokens"`` (language models), ``"patches"`` (vision transformers) or ``"pixels"`` (any image
            model); ``None`` detects it: a ViT gets patches, a transformers model with a token embedding (or a
            named ``embedding``) gets tokens, any other model with an ``nn.Conv2d`` gets pixels.
        deep: Patch prompts only: fresh prompts at every block (VPT-deep) instead of the first (VPT-shallow).
        embedding: Name of the ``nn.Embedding`` that embeds the input tokens of a model of your own; its output
            gains the prompt in front. Leave unset for transformers models.
        keep_virtual_outputs: Keep the prompt positions in the outputs (logits, hidden states, ViT token
            sequences). By default they are removed, so outputs line up with the real inputs.
        truncation: When input plus prompt exceed the model's maximum length, drop real tokens from this side
            (``"left"`` or ``"right"``); ``None`` (default) raises an error instead.
        width: Pixel prompts: border width in pixels (Bahng et al. 2022 use 30 on 224-pixel images).
        pixel_region: Pixel prompts: a ``"border"`` frame (default) or the ``"full"`` image.
        image_size: Pixel prompts: image size ``H`` or ``[H, W]``; inputs of another size are refused. Read from
            the model when it declares one (torchvision/timm/transformers ViTs). Unset on a model that takes any
            size (ResNet), the prompt is learned at 224x224 and resized along the edges to each input, keeping the
            border ``width`` pixels wide (see :mod:`lightning_peft.prompt.pixels`).
        image_module: Pixel prompts: name of the module that first receives the image (default: the first
            ``nn.Conv2d``).
        The fields every method has (``trainable_modules``, e.g. a classifier head, ``batchnorm``, ``seed``,
        ``adapter_dtype``) are keyword-only; see :class:`~lightning_peft.methods.MethodConfig`.

    Example:
        >>> import torch
        >>> from lightning_peft import inject
        >>> cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> cnn = inject(cnn, PromptTuningConfig(kind="pixels", width=2, image_size=8))
        >>> [n for n, p in cnn.named_parameters() if p.requires_grad]
        ['0.prompt_top', '0.prompt_bottom', '0.prompt_left', '0.prompt_right']
        >>> cnn(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 4, 6, 6])
    """

    method_name: ClassVar[str] = "prompt"
    label: ClassVar[str] = "prompt tuning"
    num_tokens: int = 20
    init: PromptInit = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    kind: PromptKind | None = None
    deep: bool = False
    embedding: str | None = None
    keep_virtual_outputs: bool = False
    truncation: Truncation | None = None
    width: int = 30
    pixel_region: PixelRegion = "border"
    image_size: int | list[int] | None = None
    image_module: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_tokens", self.num_tokens, "prompt tokens")
        check_positive_int("width", self.width, "pixels")
        check_choice("init", self.init, PromptInit)
        check_choice("pixel_region", self.pixel_region, PixelRegion)
        if self.kind is not None:
            check_choice("kind", self.kind, PromptKind)
        if self.truncation is not None:
            check_choice("truncation", self.truncation, Truncation)
        if self.init == "text" and (not self.init_text or not self.tokenizer):
            missing = "init_text" if not self.init_text else "tokenizer"
            raise ValueError(
                f"init='text' needs both init_text and tokenizer; {missing} is missing. Pass e.g. "
                "init_text='Classify the sentiment:', tokenizer='path/to/tokenizer', or use init='vocab'."
            )
        if self.init != "random" and self.kind in ("patches", "pixels"):
            raise ValueError(f"init={self.init!r} needs a token vocabulary; {self.kind} prompts start 'random'.")
        sizes = [self.image_size] if isinstance(self.image_size, int) else self.image_size
        if sizes is not None and not (
            isinstance(sizes, list) and len(sizes) == (1 if isinstance(self.image_size, int) else 2)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
        ):
            raise ValueError(f"image_size must be a positive int or [height, width]; got {self.image_size!r}.")

    def sites(self, model: nn.Module) -> list[Site[Any]]:
        """Where prompts of the chosen (or detected) kind go: input embeddings, ViT blocks or the image stem."""
        already = is_prompted(model)
        if already:
            raise ValueError(
                f"{type(model).__name__} already has prompts ({', '.join(already[:3])}); a model takes one "
                "PromptTuning. Call lightning_peft.unload(model) first to replace them."
            )
        kind = self.kind or detect_kind(model, self.embedding)
        if kind == "tokens" and self.embedding is not None:
            return [Site(self.embedding, named_embedding(model, self.embedding), None)]
        if kind == "tokens":
            hosts = token_hosts(model)
            if not hosts:
                raise ValueError(_not_found(model, "no transformers model with an nn.Embedding input embedding"))
            return [Site(*host_embedding(model, cast("PreTrainedModel", host)), host) for _, host in hosts]
        if kind == "patches":
            placements = patch_placements(model, self.deep, self.keep_virtual_outputs)
            if not placements:
                raise ValueError(_not_found(model, "no torchvision, timm or transformers VisionTransformer"))
            return [Site(name, model.get_submodule(name), placement) for name, placement in placements]
        name, module = image_module(model, self.image_module)
        return [Site(name, module, pixel_placement(model, self.image_size))]

    def build(self, model: nn.Module, site: Site[Any], seed: int) -> PromptAdapter:
        """The prompt adapter for ``site``: a token, patch-token or pixel prompt."""
        placement = site.detail
        if isinstance(placement, PatchPlacement):
            vit = placement.vit
            return PatchPrompt(site.module, self.num_tokens, vit.dim, vit.prefix_tokens, placement.mode,
                               placement.remove, vit.patch_fan_in, seed)
        if isinstance(placement, PixelPlacement):
            channels = getattr(site.module, "in_channels", 3)
            return PixelPrompt(site.module, channels, placement.size, self.width, self.pixel_region, seed,
                               any_size=placement.any_size)
        ids = init_ids(self.init, self.init_text, self.tokenizer)
        if placement is None:  # the embedding of a model of your own: its output gains the prompt in front
            return TokenPrompt(site.module, self.num_tokens, self.init, ids, seed, prepend_output=True)
        adapter = TokenPrompt(site.module, self.num_tokens, self.init, ids, seed)
        adapter.keep_virtual_outputs = self.keep_virtual_outputs
        adapter.truncation = self.truncation
        hook_into_transformers(adapter, placement)
        return adapter


def detect_kind(model: nn.Module, embedding: str | None = None) -> PromptKind:
    """The prompt kind that fits ``model``: patches for a ViT, tokens for a language model, pixels for a CNN.

    Raises:
        ValueError: Nothing in the model takes prompts; the message lists what was searched.
    """
    if embedding is not None:
        return "tokens"
    if find_vits(model):
        return "patches"
    if token_hosts(model):
        return "tokens"
    if image_inputs(model):
        return "pixels"
    raise ValueError(_not_found(model, "nothing"))


def _not_found(model: nn.Module, what: str) -> str:
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)][:5]
    return (
        f"PromptTuning found {what} in {type(model).__name__}. It searched for a torchvision, timm or "
        "transformers VisionTransformer (patch prompts), a transformers model whose get_input_embeddings() is "
        "an nn.Embedding (token prompts) and an nn.Conv2d taking the image (pixel prompts). For a text model of "
        "your own pass embedding='<name of its nn.Embedding>'"
        + (f" (it has {', '.join(embeddings)})" if embeddings else "")
        + "; for images pass kind='pixels' with image_module='<module that first receives the image>'."
    )

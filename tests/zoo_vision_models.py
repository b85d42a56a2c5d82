"""Randomly initialised vision models for the zoo sweep: every torchvision classification family and ~40 timm
architectures, each at its smallest variant, with one batch of images.

Each entry builds the model a user would take (10 classes, random weights, small inputs: 32x32 where the
architecture allows, a declared ``image_size`` for the ViTs) and calibrates its BatchNorm statistics on the batch
(:func:`calibrated`): with the default running statistics (mean 0, variance 1) a deep random CNN's activations
grow or vanish layer by layer, and an output of size 1e6 or 1e-6 would make every tolerance meaningless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from zoo_checks import nondegenerate

BATCH = 2


@dataclass(frozen=True)
class VisionModel:
    """One architecture of the sweep: how to build it, its input size and what the methods find in it."""

    build: Callable[[], nn.Module]
    size: int = 32
    #: The prompt kind PromptTuning detects: patch tokens for a ViT-like model, a pixel border otherwise.
    prompt_kind: Literal["pixels", "patches"] = "pixels"
    #: Prefix tuning: ``"ok"`` (it applies and passes every check), ``"no attention"`` (a CNN or MLP: refused,
    #: by the method's definition) or ``"gap"`` (attention of a kind no prefix handler takes yet: refused with
    #: an error naming those layers; listed in the README).
    prefix: Literal["ok", "no attention", "gap"] = "no attention"
    #: Spread of the seeded adapter move (zoo_checks.check_cell): LeViT's Hardswish activations saturate at 0.05.
    move: float = 0.05

    def inputs(self) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(4)
        return (torch.randn(BATCH, 3, self.size, self.size, generator=generator, dtype=torch.float64),)


def calibrated(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``inputs`` (one train-mode forward without
    gradients, cumulative averaging) after zero-initialised weights got small values (:func:`nondegenerate`),
    scale the last ``nn.Linear`` (the classifier head) so that the outputs on
    ``inputs`` peak at 1 (a random AlexNet's peak at 0.02, a random EfficientNetV2's at 1e19), then return
    ``model`` in eval mode. The model computes the same function up to that one constant. Models run in float64:
    a random 50-layer CNN amplifies float32 rounding past any useful tolerance, float64 leaves only real
    differences (a merge that is not exact, a reload that changes something)."""
    model = nondegenerate(model.double())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        with torch.no_grad():
            model(*inputs)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if heads:
        with torch.no_grad():
            peak = model.eval()(*inputs).abs().max()
            heads[-1].weight.div_(peak)
            if heads[-1].bias is not None:
                heads[-1].bias.div_(peak)
    return model.eval()


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        return models.get_model(name, weights=None, num_classes=10, **kwargs)

    return build


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _convmixer() -> nn.Module:
    """A small ConvMixer (the registered ones fix 32 blocks of width 768; their 7x7 patches would leave the
    last 4 rows of a 32x32 image, and a prompt border there, unseen)."""
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim=64, depth=2, kernel_size=3, patch_size=4, num_classes=10)


#: Every torchvision classification family (``torchvision.models.list_models``), at its smallest variant; the
#: sweep of every variant at once, injection only, runs on the meta device (tests/test_zoo_vision.py).
TORCHVISION: dict[str, VisionModel] = {
    **{name: VisionModel(_torchvision(name)) for name in (  # 32x32 inputs, pixel prompts, no attention
        "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "mnasnet0_5", "mobilenet_v2",
        "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
        "shufflenet_v2_x0_5", "vgg11_bn", "wide_resnet50_2",
    )},
    "alexnet": VisionModel(_torchvision("alexnet"), size=64),
    "googlenet": VisionModel(_torchvision("googlenet", aux_logits=False, init_weights=True)),
    "inception_v3": VisionModel(_torchvision("inception_v3", aux_logits=False, init_weights=True), size=75),
    "squeezenet1_1": VisionModel(_torchvision("squeezenet1_1"), size=64),
    "swin_t": VisionModel(_torchvision("swin_t"), prefix="gap"),
    "swin_v2_t": VisionModel(_torchvision("swin_v2_t"), prefix="gap"),
    "vit_b_16": VisionModel(_torchvision("vit_b_16", image_size=32), prompt_kind="patches", prefix="ok"),
}

_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)

#: ~40 timm architectures, each small (a tiny variant, or fewer blocks and channels through its kwargs).
TIMM: dict[str, VisionModel] = {
    **{name: VisionModel(_timm(name)) for name in (  # 32x32 inputs, pixel prompts, no attention
        "resnet18", "resnet10t", "resnet34d", "resnetv2_50", "dla46_c", "mnasnet_small", "spnasnet_100",
        "fbnetc_100", "hardcorenas_a", "selecsls42b", "resnext26ts", "seresnext26d_32x4d", "convnext_atto",
        "convnextv2_atto", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_100",
        "densenet121", "repvgg_a0", "dla34", "cspresnet50", "rexnet_100", "mixnet_s", "poolformer_s12",
        "fastvit_t8", "tinynet_e", "lcnet_050", "efficientnetv2_rw_t", "regnetx_002", "regnety_002",
    )},
    "ghostnetv2_100": VisionModel(_timm("ghostnetv2_100"), size=64),  # its attention pooling needs > 32x32
    "convmixer": VisionModel(_convmixer),
    "inception_v3": VisionModel(_timm("inception_v3"), size=75),
    "hrnet_w18_small": VisionModel(_timm("hrnet_w18_small"), size=64),
    **{name: VisionModel(_timm(name, img_size=32, depth=2), prompt_kind="patches", prefix="ok")
       for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")},
    "beit_base_patch16_224": VisionModel(_timm("beit_base_patch16_224", **_VIT), prefix="gap"),
    "eva02_tiny_patch14_224": VisionModel(_timm("eva02_tiny_patch14_224", img_size=28, depth=2),
                                          size=28, prefix="gap"),
    "swin_tiny_patch4_window7_224": VisionModel(
        _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=32, depths=(1, 1, 1, 1)),
        prefix="gap"),
    "mixer_s16_224": VisionModel(_timm("mixer_s16_224", img_size=32)),
    "coatnet_nano_rw_224": VisionModel(_timm("coatnet_nano_rw_224", img_size=64), size=64, prefix="gap"),
    "maxvit_nano_rw_256": VisionModel(_timm("maxvit_nano_rw_256", img_size=64), size=64, prefix="gap"),
    "edgenext_xx_small": VisionModel(_timm("edgenext_xx_small"), prefix="gap"),
    "mobilevit_xxs": VisionModel(_timm("mobilevit_xxs"), size=64, prefix="ok"),
    "pvt_v2_b0": VisionModel(_timm("pvt_v2_b0"), prefix="gap"),
    "levit_128s": VisionModel(_timm("levit_128s", img_size=128), size=128, prefix="ok", move=0.005),
    "tiny_vit_5m_224": VisionModel(_timm("tiny_vit_5m_224", window_sizes=(2, 2, 4, 2)), size=64, prefix="ok"),
    "efficientformer_l1": VisionModel(_timm("efficientformer_l1"), size=224, prefix="ok"),  # fixed 7x7 attention
}

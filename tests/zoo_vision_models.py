"""Randomly initialised vision models for the zoo sweep: every torchvision classification family and ~40 timm
architectures, each at its smallest variant, with one batch of images.

Each entry builds the model a user would take (10 classes, random weights, small inputs: 32x32 where the
architecture allows, a declared ``image_size`` for the ViTs) and calibrates its layers and BatchNorm statistics on
the batch (:func:`calibrated`): uncalibrated, a deep random CNN's activations grow or vanish layer by layer, gates
saturate, and an output of size 1e6 or 1e-6 would make every tolerance meaningless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from zoo_checks import nondegenerate

BATCH = 2
#: Images :func:`calibrated` sets the layers' scales and the BatchNorm statistics on.
CALIBRATION = 8


@dataclass(frozen=True)
class VisionModel:
    """One architecture of the sweep: how to build it, its input size and what the methods find in it."""

    build: Callable[[], nn.Module]
    size: int = 32
    #: The prompt kind PromptTuning detects: patch tokens for a ViT-like model, a pixel border otherwise.
    prompt_kind: Literal["pixels", "patches"] = "pixels"
    #: Prefix tuning: ``"ok"`` (it applies and passes every check), ``"no attention"`` (a CNN or MLP: refused,
    #: by the method's definition), ``"not defined"`` (attention with no token axis to prefix: EdgeNeXt's XCA
    #: attends over channels; refused with that reason) or ``"gap"`` (attention of a kind no prefix handler takes
    #: yet: refused with an error naming those layers; listed in the README).
    prefix: Literal["ok", "no attention", "not defined", "gap"] = "no attention"
    #: Spread of the seeded adapter move (zoo_checks.check_cell). Calibrated layers have weights of size
    #: 1/sqrt(fan_in), so a LoRA move of 0.05 (r=4, scale 4) on each of 50 convolutions is as large as the
    #: weights and the activations of a deep net grow to 1e10, where every gate saturates; 0.01 keeps them O(1).
    move: float = 0.01

    def inputs(self, batch: int = BATCH, seed: int = 4) -> tuple[torch.Tensor]:
        """A seeded batch of images (the checks run on ``inputs()``; :func:`calibrated` on a larger one)."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 3, self.size, self.size, generator=generator, dtype=torch.float64),)


def calibrated(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """A data-dependent initialisation of a random ``model`` on ``inputs`` (a calibration batch of
    :data:`CALIBRATION` images, not the checked one), in float64; returns it in eval mode.

    Zero-initialised weights get small values first (:func:`nondegenerate`). Then one eval-mode forward visits
    the layers in the order they run: each convolution and linear layer is scaled (weight and bias) so that its
    output has standard deviation 1 (LSUV, Mishkin & Matas 2016), and each BatchNorm gets the mean and variance
    of the input it sees as running statistics. Layers after one see its calibrated output, so the eval-mode
    network is calibrated as it will run. Last, the classifier head (the last ``nn.Linear``) is scaled so that
    the outputs peak at 1.

    Without it a random network's activations drift layer by layer (a random EfficientNetV2's outputs peaked at
    1e19; a squeeze-excitation's gate saw pre-activations of 30 to 4e4, its hard sigmoid saturated and no
    gradient reached the layers before it), and BatchNorm statistics calibrated in train mode do not fit the
    eval-mode activations of a batch of 2 at 1x1 resolution. Statistics of the checked batch of 2 themselves
    would not do either: at 1x1 resolution a channel's variance is that of two numbers, near zero for some
    channels, and such a BatchNorm amplifies any change of its input (a LoRA move) by up to 1/sqrt(eps); the
    same holds for 8 images at 1x1 (torchvision's efficientnet_v2_s reached 1e6 after 40 blocks), so a channel's
    variance is floored at the layer's mean variance.
    Models run in float64: a random 50-layer CNN
    amplifies float32 rounding past any useful tolerance; float64 leaves only real differences (a merge that is
    not exact, a reload that changes something).
    """
    model = nondegenerate(model.double()).eval()
    seen: set[nn.Module] = set()  # a module called twice keeps its first calibration

    def unit_std(module: nn.Module, args: Any, output: Any) -> Any:
        if module in seen or not isinstance(output, torch.Tensor):
            return None
        seen.add(module)
        std = float(output.std())
        if not 1e-12 < std < float("inf"):
            return None
        module.weight.div_(std)
        if module.bias is not None:
            module.bias.div_(std)
        return output / std

    def input_statistics(module: nn.modules.batchnorm._BatchNorm, args: Any) -> None:
        if module in seen or module.running_mean is None or module.running_var is None:
            return
        seen.add(module)
        x = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)  # (channels, everything else)
        module.running_mean.copy_(x.mean(dim=1))
        variance = x.var(dim=1, unbiased=False)
        module.running_var.copy_(variance.clamp(min=float(variance.mean())))  # see below: no near-zero variance

    layers = (nn.Linear, nn.modules.conv._ConvNd)
    hooks = [m.register_forward_hook(unit_std) for m in model.modules() if isinstance(m, layers)]
    hooks += [m.register_forward_pre_hook(input_statistics) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if heads:
        with torch.no_grad():
            peak = model(*inputs).abs().max()
            heads[-1].weight.div_(peak)
            if heads[-1].bias is not None:
                heads[-1].bias.div_(peak)
    return model


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


def _maxvit() -> nn.Module:
    """torchvision's MaxVit at a small configuration: maxvit_t (partition 7, four stages) takes 224x224 inputs
    only, 6 s for one float64 forward and backward on a CPU core; this one keeps its blocks (MBConv, window and
    grid attention with the relative bias) on 64x64 images, partition 4, two stages."""
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


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
    "alexnet": VisionModel(_torchvision("alexnet"), size=64, move=0.05),  # a 0.01 border moves logits 6e-4
    "googlenet": VisionModel(_torchvision("googlenet", aux_logits=False, init_weights=True)),
    "inception_v3": VisionModel(_torchvision("inception_v3", aux_logits=False, init_weights=True), size=75),
    "squeezenet1_1": VisionModel(_torchvision("squeezenet1_1"), size=64, move=0.05),
    "maxvit": VisionModel(_maxvit, size=64, prefix="ok", move=0.05),  # a 0.01 border moves logits 1e-3
    "swin_t": VisionModel(_torchvision("swin_t"), prefix="ok"),
    "swin_v2_t": VisionModel(_torchvision("swin_v2_t"), prefix="ok"),
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
    "beit_base_patch16_224": VisionModel(_timm("beit_base_patch16_224", **_VIT), prefix="ok"),
    "eva02_tiny_patch14_224": VisionModel(_timm("eva02_tiny_patch14_224", img_size=28, depth=2),
                                          size=28, prefix="ok"),
    "swin_tiny_patch4_window7_224": VisionModel(
        _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=32, depths=(1, 1, 1, 1)),
        prefix="ok"),
    # 64x64: at 32x32 the last stage is 1x1, its one relative coordinate (0, 0) feeds zeros to cpb_mlp's first
    # linear, whose LoRA A then gets no gradient
    "swinv2_tiny_window8_256": VisionModel(
        _timm("swinv2_tiny_window8_256", img_size=64, window_size=4, embed_dim=32, depths=(1, 1, 1, 1),
              num_heads=(2, 4, 8, 16)),
        size=64, prefix="ok"),
    "mixer_s16_224": VisionModel(_timm("mixer_s16_224", img_size=32)),
    "coatnet_nano_rw_224": VisionModel(_timm("coatnet_nano_rw_224", img_size=64), size=64, prefix="ok"),
    "maxvit_nano_rw_256": VisionModel(_timm("maxvit_nano_rw_256", img_size=64), size=64, prefix="ok"),
    "edgenext_xx_small": VisionModel(_timm("edgenext_xx_small"), prefix="not defined"),
    "mobilevit_xxs": VisionModel(_timm("mobilevit_xxs"), size=64, prefix="ok"),
    "pvt_v2_b0": VisionModel(_timm("pvt_v2_b0"), prefix="ok"),
    "levit_128s": VisionModel(_timm("levit_128s", img_size=128), size=128, prefix="ok", move=0.005),
    "tiny_vit_5m_224": VisionModel(_timm("tiny_vit_5m_224", window_sizes=(2, 2, 4, 2)), size=64, prefix="ok"),
    "efficientformer_l1": VisionModel(_timm("efficientformer_l1"), size=224, prefix="ok"),  # fixed 7x7 attention
}

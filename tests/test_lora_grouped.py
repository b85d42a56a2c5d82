"""LoRA on grouped and depthwise convolutions at any rank (``conv_groups="shared"``, the default).

The update is ``ΔW = B A`` with the weight seen as an ``(out, in/groups · prod(k))`` matrix; the tests write the
adapted convolution out with ``torch.nn.functional`` and compare outputs and gradients (1e-5, fp32), check merge
against the adapter (1e-5 relative), the parameter counts on real torchvision layers, and the PEFT refusal.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRA, adapters, inject, merge, save_adapter, unmerge
from lightning_peft.errors import PEFTWarning
from lightning_peft.lora import LoRAConfig, LoRAConv

CONVS = {
    "depthwise2d": (nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 7, 7)),
    "depthwise_multiplier2d": (nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), (2, 4, 9, 9)),
    "grouped2d_dilated": (nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3), (2, 6, 8, 8)),
    "grouped2d_circular": (nn.Conv2d(6, 6, (3, 2), padding=1, padding_mode="circular", groups=3), (2, 6, 6, 7)),
    "depthwise1d_reflect": (nn.Conv1d(5, 5, 5, padding=2, padding_mode="reflect", groups=5), (3, 5, 12)),
    "grouped3d": (nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1, groups=2), (1, 4, 5, 6, 6)),
}


def _adapted(kind: str, r: int, **config: object) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conv, shape = CONVS[kind]
    model = inject(nn.Sequential(conv.__class__(**_conv_kwargs(conv))), LoRA(r=r, alpha=2.0, target_modules=["0"],
                                                                           **config))
    with torch.no_grad():
        model[0].lora_B.normal_(0.0, 0.5)  # B = 0 at init would hide errors
    return model, torch.randn(shape)


def _conv_kwargs(conv: nn.Module) -> dict[str, object]:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                padding_mode=conv.padding_mode)


def _formula(layer: LoRAConv, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``conv(pad(x), W + s · (B (out x r) @ A (r x in/g·prod k)).reshape(W.shape))`` with the base's groups."""
    conv = layer.base_layer
    weight = conv.weight
    delta = (b.reshape(weight.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(weight.shape)
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return fn(x, weight + layer.scale * delta, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("kind", list(CONVS))
def test_shared_update_equals_the_formula_in_outputs_and_gradients_and_merges_exactly(kind: str, r: int) -> None:
    model, x = _adapted(kind, r)
    layer = model[0]
    assert layer.lora_A.shape == (r, *layer.base_layer.weight.shape[1:])  # A: r x in/g x k, any r
    assert layer.lora_B.shape[:2] == (layer.base_layer.out_channels, r)  # B: out x r, shared by the groups
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    x.requires_grad_()
    out = model(x)
    expected = _formula(layer, x, a, b)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B), grad)
    want = torch.autograd.grad(expected, (x, a, b), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert layer.base_layer.weight.grad is None  # the base weight stays frozen

    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        merged = model(x)
        unmerge(model)
        again = model(x)
    scale = unmerged.abs().max()
    assert (merged - unmerged).abs().max() / scale < 1e-5 and (again - unmerged).abs().max() / scale < 1e-5


def test_shared_form_with_dropout_equals_base_plus_delta_conv_of_the_dropped_input(
    dropout_masks: list[torch.Tensor],
) -> None:
    model, x = _adapted("grouped2d_circular", 2, dropout=0.5)
    layer = model[0].train()
    out = layer(x)
    dropped = dropout_masks[0] * x / 0.5  # the mask the adapter drew
    base = layer.base_layer(x)
    zero = torch.zeros_like(layer.lora_A)  # the formula with W's part removed: s · conv(dropped, ΔW)
    delta_only = _formula(layer, dropped, layer.lora_A, layer.lora_B) - _formula(layer, dropped, zero, layer.lora_B)
    torch.testing.assert_close(out, base + delta_only, atol=1e-5, rtol=1e-5)


def test_per_group_form_stays_selectable_with_its_rank_rule() -> None:
    model, x = _adapted("grouped2d_dilated", 3, conv_groups="per_group")
    layer = model[0]
    assert not layer.shared_over_groups and layer.lora_B.shape[:2] == (9, 1)  # rank 3 / 3 groups per group
    a, b = layer.lora_A.reshape(3, 1, -1), layer.lora_B.reshape(3, 3, 1)  # per group: A_j (1 x 2·9), B_j (3 x 1)
    per_group = torch.cat([b[j] @ a[j] for j in range(3)]) * layer.scale  # group j's out rows get B_j A_j
    torch.testing.assert_close(layer.delta_matrix(), per_group)
    weight = layer.base_layer.weight + per_group.reshape(layer.base_layer.weight.shape)
    torch.testing.assert_close(model(x), F.conv2d(x, weight, layer.base_layer.bias, 1, 2, 2, 3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="conv_groups='shared' \\(any rank\\)"):
        _adapted("grouped2d_dilated", 2, conv_groups="per_group")
    with pytest.raises(ValueError, match="conv_groups=.blocks. is not one of .shared., .per_group."):
        LoRAConfig(conv_groups="blocks")  # type: ignore[arg-type]


# parameters of the update, stated (r = 8): the layer's own weight, the shared form, the per-group form
REAL_LAYERS = {
    "mobilenet_v2 last depthwise": (nn.Conv2d(960, 960, 3, padding=1, groups=960, bias=False), 8640, 7752, None),
    "resnext50 layer1 grouped": (nn.Conv2d(128, 128, 3, padding=1, groups=32, bias=False), 4608, 1312, None),
    "resnext50 layer4 grouped": (nn.Conv2d(1024, 1024, 3, padding=1, groups=32, bias=False), 294912, 10496, None),
    "regnet_y_400mf grouped (8 groups)": (nn.Conv2d(208, 208, 3, padding=1, groups=26, bias=False), 14976, 2240,
                                          None),
    "grouped, 8 groups": (nn.Conv2d(64, 64, 3, padding=1, groups=8, bias=False), 4608, 1088, 640),
}


@pytest.mark.parametrize("name", list(REAL_LAYERS))
def test_parameter_counts_of_real_grouped_layers(name: str) -> None:
    conv, own, shared, per_group = REAL_LAYERS[name]
    assert conv.weight.numel() == own
    k = math.prod(conv.kernel_size)
    layer = inject(nn.Sequential(conv), LoRA(r=8, target_modules=["0"]))[0]
    count = layer.lora_A.numel() + layer.lora_B.numel()
    assert count == shared == 8 * (conv.in_channels // conv.groups * k + conv.out_channels)
    if per_group is not None:
        grouped = inject(nn.Sequential(nn.Conv2d(**_conv_kwargs(conv))), LoRA(r=8, target_modules=["0"],
                                                                               conv_groups="per_group"))[0]
        assert grouped.lora_A.numel() + grouped.lora_B.numel() == per_group


@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_y_400mf"])
def test_all_conv_default_rank_8_adapts_every_conv_of_modern_cnns_and_merges_exactly(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    grouped = [n for n in convs if model.get_submodule(n).groups > 1]
    inject(model, LoRA(r=8, target_modules="all-conv"))
    assert grouped and all(isinstance(model.get_submodule(n), LoRAConv) for n in convs)
    with torch.no_grad():
        for n in grouped:
            model.get_submodule(n).lora_B.normal_(0.0, 0.05)
        x = torch.randn(1, 3, 32, 32)
        unmerged = model(x)
        merge(model)
        merged = model(x)
    assert (merged - unmerged).abs().max() / unmerged.abs().max() < 1e-5


def test_peft_export_refuses_both_grouped_forms_saying_why(tmp_path: Path) -> None:
    shared = inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), LoRA(r=3, target_modules=["0"]))
    with pytest.raises(ValueError, match="groups=4 with conv_groups='shared' \\(one B A shared by all groups"):
        save_adapter(shared, tmp_path / "a", format="peft")
    per_group = inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), LoRA(r=2, target_modules=["0"],
                                                                          conv_groups="per_group"))
    with pytest.raises(ValueError, match="our per-group A is a grouped conv, PEFT's an ungrouped one"):
        save_adapter(per_group, tmp_path / "b", format="peft")
    assert not any(tmp_path.iterdir())


def test_an_adapter_larger_than_its_layer_is_named_with_the_rank_that_would_not_be() -> None:
    # a depthwise 3x3 conv of 32 channels is a 32 x 9 matrix (288 values); r=8 adds 8 · (9 + 32) = 328
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=32, bias=False), nn.Conv2d(32, 64, 1, bias=False))
    with pytest.warns(PEFTWarning, match=r"in 1 of 2 layers, e\.g\. '0' \(Conv2d: rank 8 adds 328 values, the layer "
                                         r"holds 288\).*rank_pattern=\{'0': 7\}.*trainable_modules"):
        inject(copy.deepcopy(model), LoRA(r=8, target_modules="all-conv"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PEFTWarning)  # the suggested rank: 7 · 41 = 287 <= 288, no warning
        adapted = inject(copy.deepcopy(model), LoRA(r=8, target_modules="all-conv", rank_pattern={"0": 7}))
    assert {n: a.r for n, a in adapters(adapted)} == {"0": 7, "1": 8}  # nothing changed behind the user's back

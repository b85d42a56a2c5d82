"""The LoRA convolution paths (fused, folded, adapter; ``conv_path``) equal the three-convolution formula, in values
and in every gradient; a forced path that cannot run is refused with the reason and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRA, inject
from lightning_peft.lora import LoRAConfig, LoRAConv

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _reference(conv: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, x: torch.Tensor) -> torch.Tensor:
    """The formula written out: pad (non-zero modes), conv with W, conv with A, grouped 1x1 conv with B."""
    fn = _CONV_FN[conv.weight.dim() - 2]
    padding: object = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    kw = dict(stride=conv.stride, padding=padding, dilation=conv.dilation, groups=conv.groups)
    return fn(x, conv.weight, conv.bias, **kw) + scale * fn(fn(x, a, None, **kw), b, groups=conv.groups)


CASES = {
    "plain3x3": (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), 4),
    "grouped": (nn.Conv2d, dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3), 6),
    "dilated_strided": (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=2, dilation=2), 4),
    "circular_padded": (nn.Conv2d, dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, padding_mode="circular"), 2),
    "reflect_grouped_strided": (
        nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                        padding_mode="reflect", groups=2, bias=False), 4),
    "depthwise": (nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4), 4),
    "pointwise": (nn.Conv2d, dict(in_channels=6, out_channels=8, kernel_size=1), 2),
    "conv1d_dilated": (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2), 2),
    "conv3d_grouped": (nn.Conv3d, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2), 2),
}


def _adapted(kind: str, conv_path: str = "auto") -> tuple[nn.Module, LoRAConv]:
    cls, kwargs, r = CASES[kind]
    torch.manual_seed(0)
    model = nn.Sequential(cls(**kwargs))
    inject(model, LoRA(r=r, alpha=3.0, target_modules=["0"], conv_groups="per_group", conv_path=conv_path))  # fusable
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide errors in every gradient but B's
    return model, layer


def _input(layer: LoRAConv) -> torch.Tensor:
    spatial = {1: (11,), 2: (9, 8), 3: (5, 6, 4)}[layer.base_layer.weight.dim() - 2]
    return torch.randn(4, layer.base_layer.in_channels, *spatial)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", list(CASES))
def test_fused_conv_matches_three_convolution_formula_in_output_and_gradients(
    kind: str, dtype: torch.dtype, tol: float
) -> None:
    # fp64 shows the algebra is exact; fp32 differs only by summation order (sums over N·L positions)
    model, layer = _adapted(kind)
    model.to(dtype)
    x = _input(layer).to(dtype).requires_grad_()
    out = layer(x)
    assert out.grad_fn is not None and "FusedLoRAConv" in type(out.grad_fn).__name__  # the fused path ran
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B], grad_out)

    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = _reference(layer.base_layer, a, b, layer.scale, x_ref)
    want = torch.autograd.grad(expected, [x_ref, a, b], grad_out)

    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    for name, g, w in zip(["input", "lora_A", "lora_B"], got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("kind", ["grouped", "circular_padded", "conv3d_grouped"])
def test_unmerged_inference_folds_the_update_into_one_convolution(kind: str) -> None:
    _, layer = _adapted(kind)
    x = _input(layer)
    with torch.no_grad():
        out = layer(x)
        expected = _reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x)
        assert layer.path(x) == "folded"  # not the plain one
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_trainable_bias_gets_its_gradient_through_the_fused_path() -> None:
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), LoRA(r=2, target_modules=["0"], bias="lora_only"))
    layer = model[0]
    x = torch.randn(2, 3, 5, 5)
    out = layer(x)  # N = 2 gives enough positions for a 4x3x3 conv to fuse
    assert "FusedLoRAConv" in type(out.grad_fn).__name__
    (grad_bias,) = torch.autograd.grad(out.sum(), [layer.base_layer.bias])
    torch.testing.assert_close(grad_bias, torch.full((4,), 2 * 25.0))  # d(sum)/d(bias_c) = N·H·W


def test_dropout_and_conv_path_adapter_take_the_plain_path_with_the_same_result() -> None:
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), LoRA(r=2, target_modules=["0"], dropout=0.5))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero update, so a wrong path would show in the output
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    assert layer.path(x) == "adapter"  # training-mode dropout feeds A another input
    layer.eval()
    assert layer.path(x) == "fused"  # eval: dropout is the identity
    fused = layer(x)
    assert "FusedLoRAConv" in type(fused.grad_fn).__name__
    expected = _reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    layer.conv_path = "adapter"
    assert layer.path(x) == "adapter"
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # the plain path, the same result


def test_fused_conv_under_bf16_autocast_matches_the_formula_in_bf16() -> None:
    _, layer = _adapted("grouped")
    x = _input(layer).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = _reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)  # bf16 has 8 mantissa bits
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


def test_layers_with_few_output_positions_take_the_plain_path_with_the_same_result() -> None:
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv2d(8, 64, 3, padding=1)), LoRA(r=4, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(1, 8, 4, 4, requires_grad=True)  # 16 positions < 64 rows x 9 taps: a weight copy costs more
    assert layer.path(x) == "adapter"
    expected = _reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CASES))
def test_folded_gpu_path_matches_the_formula_in_output_and_adapter_gradients(kind: str) -> None:
    model, layer = _adapted(kind)
    model.double()
    x = _input(layer).double().requires_grad_(True)
    expected = _reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x)
    want = torch.autograd.grad(expected.square().sum(), [x, layer.lora_A, layer.lora_B])
    folded = layer.folded_forward(x)
    got = torch.autograd.grad(folded.square().sum(), [x, layer.lora_A, layer.lora_B])
    torch.testing.assert_close(folded, expected, rtol=1e-8, atol=1e-8)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)


def test_in_place_relu_after_the_fused_conv_trains_like_the_out_of_place_one() -> None:
    # VGG and SqueezeNet follow each conv with ReLU(inplace=True): the fused output must not be a view
    torch.manual_seed(0)
    convs = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace)) for inplace in (True, False)]
    convs[1].load_state_dict(convs[0].state_dict())
    grads = []
    for net in convs:
        net = inject(net, LoRA(r=4, target_modules=["0"]))
        with torch.no_grad():
            net[0].lora_B.normal_(generator=torch.Generator().manual_seed(2))
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        assert "FusedLoRAConv" in type(net[0](x).grad_fn).__name__  # the fused path ran
        out = net(x)
        out.square().sum().backward()
        grads.append((out.detach(), net[0].lora_A.grad, net[0].lora_B.grad))
    for got, expected in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["adapter", "folded", "fused"])
@pytest.mark.parametrize("kind", ["plain3x3", "grouped", "circular_padded", "depthwise", "conv1d_dilated"])
def test_each_forced_conv_path_runs_and_matches_the_formula_in_output_and_gradients(
    kind: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    for name in ("folded_forward", "fused_forward"):
        method = getattr(LoRAConv, name)
        monkeypatch.setattr(LoRAConv, name, lambda self, x, m=method, n=name: ran.append(n) or m(self, x))
    model, layer = _adapted(kind, conv_path=path)
    model.double()
    x = _input(layer).double()[:1].requires_grad_()  # one sample: too few positions for "auto" to fuse most
    out = layer(x)
    assert ran == {"adapter": [], "folded": ["folded_forward"], "fused": ["fused_forward"]}[path]
    expected = _reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x)
    got = torch.autograd.grad(out.square().sum(), [x, layer.lora_A, layer.lora_B])
    want = torch.autograd.grad(expected.square().sum(), [x, layer.lora_A, layer.lora_B])
    torch.testing.assert_close(out, expected, atol=1e-8, rtol=1e-8)  # fp64: the algebra, exactly
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(
    "path, conv, options, reason",
    [
        ("fused", nn.Conv2d(3, 4, 3), dict(dropout=0.1), r"it has no separate adapter input to apply dropout=0.1 to"),
        ("folded", nn.Conv2d(3, 4, 3), dict(dropout=0.1), r"it has no separate adapter input to apply dropout=0.1 to"),
        ("fused", nn.Conv2d(4, 4, 3, groups=2), {},
         r"it stacks \[W; A\] per group, but conv_groups='shared' gives this grouped conv \(groups=2\) one "
         r"update of the whole weight; use conv_groups='per_group'"),
        ("fused", nn.Conv2d(3, 4, 3, padding="same"), {}, r"it needs numeric padding, not padding='same'"),
    ],
    ids=["fused-dropout", "folded-dropout", "fused-shared-groups", "fused-same-padding"],
)
def test_forced_conv_path_that_cannot_run_is_refused_at_inject_naming_layer_reason_and_fix(
    path: str, conv: nn.Module, options: dict[str, object], reason: str
) -> None:
    message = rf"LoRA cannot adapt '0': conv_path='{path}' cannot run on this Conv2d: {reason}\. Use conv_path='auto'"
    with pytest.raises(ValueError, match=message):
        inject(nn.Sequential(conv), LoRAConfig(r=2, target_modules=["0"], conv_path=path, **options))  # type: ignore[arg-type]


def test_forced_fused_path_refuses_a_trainable_base_weight_at_the_call_and_auto_takes_the_adapter_path() -> None:
    _, layer = _adapted("plain3x3", conv_path="fused")
    layer.base_layer.weight.requires_grad_(True)  # the fused backward would leave W without its gradient
    x = _input(layer)
    with pytest.raises(ValueError, match=r"conv_path='fused' cannot run this Conv2d now: the base weight is trainable"):
        layer(x)
    layer.conv_path = "auto"
    assert layer.path(x) == "adapter"
    out = layer(x)
    (grad_w,) = torch.autograd.grad(out.sum(), [layer.base_layer.weight])
    (want,) = torch.autograd.grad(_reference(layer.base_layer, layer.lora_A, layer.lora_B, layer.scale, x).sum(),
                                  [layer.base_layer.weight])
    torch.testing.assert_close(grad_w, want, atol=1e-5, rtol=1e-5)


def test_conv_path_is_validated() -> None:
    with pytest.raises(ValueError, match=r"conv_path"):
        LoRAConfig(conv_path="fast")  # type: ignore[arg-type]

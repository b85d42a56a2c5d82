"""LoRA on layers that compute through more than ``W x``: a class with a forward of its own (timm's weight-standardized
``ScaledStdConv2d``), hooks, and parametrized weights (``weight_norm``, as wav2vec2's positional conv).

Such a layer starts exactly as its base on every convolution path, its hooks run on every call, and ``merge`` either
gives the adapted outputs (a parametrization with an exact ``right_inverse``) or refuses before changing any weight.
Expected values are the formula written out with ``F.conv*``/``F.linear``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lightning_peft import LoRA, adapters_disabled, inject, merge, unmerge
from lightning_peft.lora import LoRALayer


class StandardizedConv2d(nn.Conv2d):
    """Convolves with each output channel's weight standardized (timm's ``StdConv2d``, written out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class DoubledLinear(nn.Linear):
    """Multiplies by ``2 W``: its own forward transforms the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, 2.0 * self.weight, self.bias)


class Doubled(nn.Module):
    """A parametrization without ``right_inverse``: ``W = 2 V``."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return 2.0 * v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _lora_layers(model: nn.Module) -> list[LoRALayer]:
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


@torch.no_grad()
def _move(model: nn.Module, std: float = 0.05) -> None:
    """Give every LoRA ``B`` seeded non-zero values, so the adapters change the outputs."""
    generator = torch.Generator().manual_seed(1)
    for layer in _lora_layers(model):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator, dtype=layer.lora_B.dtype) * std)


def _run(model: nn.Module, x: torch.Tensor, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(x).detach()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "merge() changed weights before refusing"
    assert not any(layer.merged for layer in _lora_layers(model))


def _conv_delta(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``B A x`` for a convolution, written out: conv with A (the base's geometry), then 1x1 conv with B."""
    hidden = F.conv2d(x, a, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.conv2d(hidden, b)


# --- a class with a forward of its own ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nf_resnet() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("nf_resnet26", pretrained=False).double()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lora_on_nf_resnet_starts_as_its_base_and_refuses_to_merge(nf_resnet: nn.Module, mode: str) -> None:
    # 64x64, batch 2: large enough that "auto" picks the fused (with gradients) and folded (without) paths on
    # many ScaledStdConv2d layers, which convolve with the raw, unstandardized weight
    base = getattr(copy.deepcopy(nf_resnet), mode)()
    model = getattr(inject(copy.deepcopy(base), LoRA(r=4, target_modules="all-conv")), mode)()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for grad in (True, False):
        assert _rel(_run(model, x, grad), _run(base, x, grad)) <= 1e-6  # measured 0.0

    _move(model)
    moved = _run(model, x, True)
    assert _rel(moved, _run(base, x, True)) > 1e-3
    stem = model.stem.conv  # the first layer: its input is x
    expected = base.stem.conv(x) + stem.scale * _conv_delta(stem.base_layer, stem.lora_A, stem.lora_B, x)
    torch.testing.assert_close(stem(x), expected, rtol=1e-10, atol=1e-10)

    before = _state(model)
    with pytest.raises(TypeError, match=r"merge\(\) changed nothing: .*\(ScaledStdConv2d\): ScaledStdConv2d computes "
                                        r"through a forward of its own"):
        merge(model)
    _assert_unchanged(model, before)
    assert torch.equal(_run(model, x, True), moved)


LAYERS: dict[str, tuple[Callable[[], nn.Module], list[torch.Size]]] = {
    # batch 1 takes the adapter path under "auto"; batch 4 (N·H·W = 256 >= out·k·k = 72) the fused or folded one
    "conv": (lambda: StandardizedConv2d(4, 8, 3, padding=1), [torch.Size([1, 4, 8, 8]), torch.Size([4, 4, 8, 8])]),
    "linear": (lambda: DoubledLinear(6, 5), [torch.Size([3, 6])]),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_with_own_forward_is_computed_through_it_and_not_merged(kind: str) -> None:
    build, shapes = LAYERS[kind]
    torch.manual_seed(0)
    base = nn.Sequential(build()).double()
    model = inject(copy.deepcopy(base), LoRA(r=2, target_modules=["0"]))
    inputs = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for x in inputs:
            for grad in (True, False):
                assert torch.equal(_run(model, x, grad), _run(base, x, grad))

    _move(model)
    layer = model[0]
    for x in inputs:
        if kind == "conv":
            delta = _conv_delta(base[0], layer.lora_A, layer.lora_B, x)
        else:
            delta = x @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(_run(model, x, True), base(x) + layer.scale * delta, rtol=1e-10, atol=1e-10)

    before = _state(model)
    cls = type(base[0]).__name__
    with pytest.raises(TypeError, match=rf"'0' \({cls}\): {cls} computes through a forward of its own"):
        merge(model)
    _assert_unchanged(model, before)
    with pytest.raises(TypeError, match=rf"Cannot merge LoRA into this {cls}"):
        layer.merge()  # directly, too
    _assert_unchanged(model, before)


@pytest.mark.parametrize("conv_path", ["fused", "folded"])
def test_forced_one_convolution_path_is_refused_for_a_layer_with_own_forward(conv_path: str) -> None:
    with pytest.raises(ValueError, match=rf"conv_path='{conv_path}' cannot run on this StandardizedConv2d: "
                                         "StandardizedConv2d computes through a forward of its own"):
        inject(nn.Sequential(StandardizedConv2d(4, 8, 3, padding=1)), LoRA(r=2, target_modules=["0"],
                                                                            conv_path=conv_path))


def test_merge_into_linear_subclasses_with_the_plain_formula() -> None:
    # no regression: timm's Linear overrides forward with the same F.linear(x, W, b), so it still merges
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = inject(nn.Sequential(timm.layers.Linear(6, 5)).double(), LoRA(r=2, target_modules=["0"]))
    _move(model)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = model[0]
    expected = F.linear(x, layer.base_layer.weight + layer.scale * layer.lora_B @ layer.lora_A, layer.base_layer.bias)
    torch.testing.assert_close(_run(merge(model), x, False), expected, rtol=1e-12, atol=1e-12)


# --- hooks -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["pre", "post"])
def test_hooked_conv_runs_its_hook_on_every_path(hook: str) -> None:
    torch.manual_seed(0)
    calls: list[int] = []
    model = inject(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), LoRA(r=2, target_modules=["0"]))
    twin = copy.deepcopy(model)  # no hook: shows the path "auto" would take otherwise
    layer = model[0]
    conv = layer.base_layer
    if hook == "pre":  # the hook changes the base layer's input; the adapter's input stays x
        conv.register_forward_pre_hook(lambda m, args: (calls.append(1), (args[0] + 1.0,))[1])
    else:
        conv.register_forward_hook(lambda m, args, out: (calls.append(1), 2.0 * out)[1])
    _move(model)
    cases = [(torch.randn(1, 4, 8, 8), True, "adapter"), (torch.randn(4, 4, 8, 8), True, "fused"),
             (torch.randn(4, 4, 8, 8), False, "folded")]
    for x, grad, unhooked_path in cases:
        with torch.set_grad_enabled(grad):
            assert twin[0].path(x) == unhooked_path
            calls.clear()
            y = model(x)
        assert calls == [1], f"the hook did not run where the unhooked layer takes {unhooked_path!r}"
        plain = F.conv2d(x + 1.0, conv.weight, conv.bias, padding=1) if hook == "pre" else \
            2.0 * F.conv2d(x, conv.weight, conv.bias, padding=1)
        expected = plain + layer.scale * _conv_delta(conv, layer.lora_A, layer.lora_B, x)
        torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)


def test_forced_path_is_refused_while_the_base_has_a_hook() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1)
    handle = conv.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(ValueError, match="conv_path='fused' cannot run on this Conv2d: it has hooks"):
        inject(nn.Sequential(conv), LoRA(r=2, target_modules=["0"], conv_path="fused"))
    handle.remove()
    model = inject(nn.Sequential(conv), LoRA(r=2, target_modules=["0"], conv_path="folded"))
    model[0].base_layer.register_forward_hook(lambda m, args, out: None)  # after inject: refused at the call
    refusal = "conv_path='folded' cannot run this Conv2d now: it has hooks"
    with torch.no_grad(), pytest.raises(ValueError, match=refusal):
        model(torch.randn(4, 4, 8, 8))


# --- parametrized weights ----------------------------------------------------------------------------------------


def _weight_normed(kind: str, dtype: torch.dtype) -> nn.Module:
    """wav2vec2's positional conv at a small size (grouped, weight_norm over dim 2), or a weight-normed Linear; g is
    moved off ``||v||`` as training leaves it, so storing through ``right_inverse`` must re-derive both."""
    torch.manual_seed(0)
    if kind == "conv1d_grouped":
        layer = parametrizations.weight_norm(nn.Conv1d(16, 16, 5, padding=2, groups=4), name="weight", dim=2)
    else:
        layer = parametrizations.weight_norm(nn.Linear(8, 6), name="weight", dim=0)
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(1.0 + torch.rand_like(layer.parametrizations.weight.original0))
    return layer.to(dtype)


def _weight_norm_formula(layer: nn.Module, kind: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(g v / ||v|| + delta) x``, the weight_norm written out (norm over every dim but ``dim``)."""
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    if kind == "conv1d_grouped":
        weight = g * v / v.norm(dim=(0, 1), keepdim=True)
        return F.conv1d(x, weight + delta, layer.bias, padding=2, groups=4)
    return F.linear(x, g * v / v.norm(dim=1, keepdim=True) + delta, layer.bias)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["conv1d_grouped", "linear"])
def test_merge_through_weight_norm_equals_the_adapter_outputs(kind: str, dtype: torch.dtype, tol: float) -> None:
    base = nn.Sequential(_weight_normed(kind, dtype))
    model = inject(copy.deepcopy(base), LoRA(r=4, target_modules=["0"]))
    x = torch.randn((4, 16, 12) if kind == "conv1d_grouped" else (4, 8), dtype=dtype)
    plain = _run(base, x, False)
    for grad in (True, False):
        assert torch.equal(_run(model, x, grad), _run(base, x, grad))

    _move(model)
    layer = model[0]
    delta = layer.scale * (layer.lora_B.reshape(-1, layer.r) @ layer.lora_A.reshape(layer.r, -1))
    expected = _weight_norm_formula(base[0], kind, delta.reshape(layer.base_weight.shape), x).detach()
    adapted = _run(model, x, False)
    assert _rel(adapted, expected) <= tol
    assert _rel(adapted, plain) > 1e-3
    assert _rel(_run(merge(model), x, False), expected) <= tol
    assert _rel(_run(unmerge(model), x, False), expected) <= tol  # the adapter applies again
    assert _rel(layer.base_weight.detach(), base[0].weight.detach()) <= tol  # W is back
    with adapters_disabled(model):
        assert _rel(_run(model, x, False), plain) <= tol


@pytest.mark.parametrize("case", ["no_right_inverse", "orthogonal"])
def test_merge_refused_where_the_parametrization_cannot_store_the_update(case: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 6).double()
    if case == "no_right_inverse":
        parametrize.register_parametrization(layer, "weight", Doubled())
    else:
        parametrizations.orthogonal(layer)
    base = nn.Sequential(layer)
    model = inject(copy.deepcopy(base), LoRA(r=2, target_modules=["0"]))
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(_run(model, x, False), _run(base, x, False))
    _move(model)
    adapted = _run(model, x, False)
    lora = model[0]
    torch.testing.assert_close(adapted, F.linear(x, layer.weight + lora.scale * lora.lora_B @ lora.lora_A, layer.bias))

    before = _state(model)
    reason = r"parametrized by Doubled, which has no right_inverse" if case == "no_right_inverse" else \
        r"parametrization \(_Orthogonal\) cannot represent W \+ ΔW"
    with pytest.raises(TypeError, match=reason):
        merge(model)
    _assert_unchanged(model, before)
    assert torch.equal(_run(model, x, False), adapted)


def test_merge_refused_where_a_hook_computes_the_weight() -> None:
    # torch.nn.utils.weight_norm (the old, hook-based one): weight is recomputed from g and v before each call
    def build() -> nn.Module:  # twice: such a module cannot be deep-copied
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return nn.Sequential(torch.nn.utils.weight_norm(nn.Conv1d(4, 8, 3, padding=1)))

    base, model = build(), inject(build(), LoRA(r=2, target_modules=["0"]))
    x = torch.randn(8, 4, 16)  # the folded path without the hook
    assert torch.equal(_run(model, x, False), _run(base, x, False))
    _move(model)
    before = _state(model)
    with pytest.raises(TypeError, match="its weight is not a tensor it stores but one computed on each call"):
        merge(model)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["own_forward", "no_right_inverse"])
def test_pissa_refused_where_the_residual_cannot_be_exact(case: str) -> None:
    layer = DoubledLinear(6, 6)
    if case == "no_right_inverse":
        layer = parametrize.register_parametrization(nn.Linear(6, 6), "weight", Doubled())
    reason = "DoubledLinear computes through a forward of its own" if case == "own_forward" else \
        "its weight is parametrized by Doubled, which has no right_inverse"
    with pytest.raises(ValueError, match=rf"init='pissa' .*cannot be exact for this .*: {reason}"):
        inject(nn.Sequential(layer), LoRA(r=2, target_modules=["0"], init="pissa"))


def test_pissa_on_weight_norm_starts_as_its_base() -> None:
    base = nn.Sequential(_weight_normed("linear", torch.float64))
    model = inject(copy.deepcopy(base), LoRA(r=2, target_modules=["0"], init="pissa"))
    x = torch.randn(4, 8, dtype=torch.float64)
    assert _rel(_run(model, x, False), _run(base, x, False)) <= 1e-12
    layer = model[0]
    assert layer.lora_B.abs().max() > 0  # the top-r part moved into B A
    assert _rel(_run(merge(model), x, False), _run(base, x, False)) <= 1e-12


def test_wav2vec2_positional_conv_merges_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
    )
    model = transformers.Wav2Vec2Model(config).eval()
    assert parametrize.is_parametrized(model.encoder.pos_conv_embed.conv, "weight")
    with torch.no_grad():  # g off ||v||, as in a pretrained checkpoint
        model.encoder.pos_conv_embed.conv.parametrizations.weight.original0.mul_(1.5)
    model = inject(model, LoRA(r=4, target_modules=["encoder.pos_conv_embed.conv"]))
    audio = torch.randn(2, 400)
    with torch.no_grad():
        plain = model(audio).last_hidden_state
        _move(model)
        adapted = model(audio).last_hidden_state
        assert _rel(adapted, plain) > 1e-3
        assert _rel(merge(model)(audio).last_hidden_state, adapted) <= 1e-5
        assert _rel(unmerge(model)(audio).last_hidden_state, adapted) <= 1e-5
        with adapters_disabled(model):
            assert _rel(model(audio).last_hidden_state, plain) <= 1e-5

"""Prefix tuning on timm's attention with a learned per-position bias table (LeViT, TinyViT, EfficientFormer),
checked on one layer of each tiny model: disabled adapters give the base, the output equals a softmax over
``[prefix; keys]`` written out from timm's own layouts (position bias on the real columns only), gradients reach
exactly the prefix, and a gated prefix starts as the identity."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_peft import PrefixTuning, adapters_disabled, inject
from lightning_peft.prefix.attention import PrefixAttention
from lightning_peft.prefix.config import find_attention

timm = pytest.importorskip("timm")
P = 3
TOL = dict(atol=1e-6, rtol=1e-6)  # float64 layers: measured differences are ~1e-15


@dataclass(frozen=True)
class Layer:
    """One attention layer of a timm model and the input it takes there."""

    model: str
    name: str
    input_shape: tuple[int, ...]


LAYERS = {
    "levit": Layer("levit_128s", "stages.0.blocks.0.attn", (2, 64, 128)),  # 8x8 tokens, d_k 16, d_v 32
    "levit-downsample": Layer("levit_128s", "stages.1.downsample.attn_downsample", (2, 64, 128)),  # 4x4 queries
    "levit-conv": Layer("levit_conv_128s", "stages.0.blocks.0.attn", (2, 128, 8, 8)),
    "levit-conv-downsample": Layer("levit_conv_128s", "stages.1.downsample.attn_downsample", (2, 128, 8, 8)),
    "tiny_vit": Layer("tiny_vit_5m_224", "stages.2.blocks.0.attn", (3, 16, 160)),  # 3 windows of 4x4; d_k = d_v
    "tiny_vit-ratio2": Layer("", "", (3, 9, 16)),  # a TinyViT Attention with d_v = 2·d_k, built by hand
    "efficientformer": Layer("efficientformer_l1", "stages.3.blocks.4.token_mixer", (2, 49, 448)),  # 7x7 tokens
}
MODELS = {
    "levit_128s": dict(img_size=128),
    "levit_conv_128s": dict(img_size=128),
    "tiny_vit_5m_224": dict(window_sizes=(2, 2, 4, 2)),
    "efficientformer_l1": {},
}


@functools.cache
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **MODELS[name])


def randomized(module: nn.Module) -> nn.Module:
    """``module`` in float64 with every parameter and BatchNorm statistic random (timm zero-initialises the bias
    tables and LeViT's output BatchNorm weight, which would hide a bias dropped or misplaced)."""
    module = module.double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in module.named_parameters():  # weights at std 1/√fan_in; biases, norms, bias table
            fan_in = parameter[0].numel() if parameter.dim() > 1 and name != "attention_biases" else 4
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) / fan_in ** 0.5)
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.2)
                norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
    return module


def layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh random copy of the layer and an input for it."""
    spec = LAYERS[kind]
    if spec.model:
        base = copy.deepcopy(model(spec.model).get_submodule(spec.name))
    else:
        from timm.models.tiny_vit import Attention

        base = Attention(16, key_dim=8, num_heads=2, attn_ratio=2, resolution=(3, 3))
    x = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    randomized(base).eval()  # timm's train() override returns None: no chaining
    return base, x


def prefixed(base: nn.Module, gate: bool = False) -> PrefixAttention:
    wrapped = inject(nn.ModuleDict({"attn": base}), PrefixTuning(num_tokens=P, gate=gate))
    adapter = wrapped["attn"]
    assert isinstance(adapter, PrefixAttention)
    return adapter


def written_out(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                gate: torch.Tensor | None = None) -> torch.Tensor:
    """timm's forward with the prefix written in: q, k, v split exactly as timm lays them out, scores
    ``[q P_k^T, q k^T + bias]·scale`` with ``attention_biases[:, attention_bias_idxs]`` on the real columns only
    (or, gated, a separate softmax over the prefix weighted by ``tanh(gate)``)."""
    h, dk, dv = attn.num_heads, attn.key_dim, attn.val_dim
    conv = getattr(attn, "use_conv", False)
    b = x.shape[0]
    if hasattr(attn, "norm"):  # TinyViT: LayerNorm before qkv
        x = attn.norm(x)
    if conv:  # channels (h, d) over H·W positions
        n = x.shape[2] * x.shape[3]
        if hasattr(attn, "kv"):
            k, v = attn.kv(x).view(b, h, -1, n).split([dk, dv], dim=2)
            q_map = attn.q(x)
            q = q_map.view(b, h, dk, -1)
        else:
            q_map = x
            q, k, v = attn.qkv(x).view(b, h, -1, n).split([dk, dk, dv], dim=2)
        q, k, v = q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)  # (b, h, n, d)
    else:
        n = x.shape[1]
        if hasattr(attn, "kv"):
            k, v = attn.kv(x).view(b, n, h, -1).split([dk, dv], dim=3)
            q = attn.q(x).view(b, -1, h, dk)
        else:
            q, k, v = attn.qkv(x).view(b, n, h, -1).split([dk, dk, dv], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    bias = attn.attention_biases[:, attn.attention_bias_idxs]  # (h, n_q, n)
    real = q @ k.transpose(-1, -2) * attn.scale + bias
    prefix = q @ pk.transpose(-1, -2) * attn.scale  # (b, h, n_q, p): no position bias
    if gate is None:
        out = torch.cat([prefix, real], dim=-1).softmax(-1) @ torch.cat([pv.expand(b, -1, -1, -1), v], dim=-2)
    else:
        out = real.softmax(-1) @ v + torch.tanh(gate) * (prefix.softmax(-1) @ pv)
    if conv:
        out = out.transpose(-1, -2).reshape(b, h * dv, *q_map.shape[-2:])
    else:
        out = out.transpose(1, 2).reshape(b, -1, h * dv)
    return attn.proj(out)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_disabled_adapter_gives_the_base_output(kind: str) -> None:
    base, x = layer(kind)
    with torch.no_grad():
        expected = base(x)
        adapter = prefixed(base)
        with adapters_disabled(adapter):
            got = adapter(x)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - expected).abs().max() == 0  # the base's own forward


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_equals_written_out_softmax_over_prefix_and_keys(kind: str, mode: str) -> None:
    """Train mode reads the bias table afresh, eval mode through the base's own per-device cache."""
    base, x = layer(kind)
    adapter = prefixed(base).train(mode == "train")
    with torch.no_grad():
        got = adapter(x)
        expected = written_out(base, x, adapter.prefix_keys, adapter.prefix_values)
        without_prefix = base(x)
    assert got.shape == without_prefix.shape
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - without_prefix).abs().max() > 1e-3  # the prefix is read
    assert (str(x.device) in base.attention_bias_cache) == (mode == "eval")
    print(f"{kind}/{mode}: max |handler - reference| = {(got - expected).abs().max().item():.2e}")


@pytest.mark.parametrize("kind", list(LAYERS))
def test_prefix_shape_has_the_layers_key_and_value_widths(kind: str) -> None:
    base, _ = layer(kind)
    adapter = prefixed(base)
    assert adapter.prefix_keys.shape == (base.num_heads, P, base.key_dim)
    assert adapter.prefix_values.shape == (base.num_heads, P, base.val_dim)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_reach_exactly_the_prefix_tensors(kind: str) -> None:
    base, x = layer(kind)
    adapter = prefixed(base).train()
    adapter(x).square().mean().backward()
    with_grad = {n for n, p in adapter.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert with_grad == {"prefix_keys", "prefix_values"}
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gated_prefix_is_the_identity_at_init_then_a_separate_softmax(kind: str) -> None:
    base, x = layer(kind)
    with torch.no_grad():
        expected = base(x)
        adapter = prefixed(base, gate=True)
        got = adapter(x)
        torch.testing.assert_close(got, expected, **TOL)
        assert adapter.prefix_gate is not None
        adapter.prefix_gate.fill_(0.7)
        moved = adapter(x)
        reference = written_out(base, x, adapter.prefix_keys, adapter.prefix_values, gate=adapter.prefix_gate)
    torch.testing.assert_close(moved, reference, **TOL)
    assert (moved - expected).abs().max() > 1e-3
    print(f"{kind}: gate 0 max |adapter - base| = {(got - expected).abs().max().item():.2e}, "
          f"gate 0.7 max |adapter - reference| = {(moved - reference).abs().max().item():.2e}")


def test_a_prefix_copied_from_every_key_doubles_each_key_and_gives_the_base() -> None:
    """Paper semantics on EfficientFormer with a zero bias table: a prefix equal to all n tokens' keys and values
    duplicates every key, the softmax halves each weight, the output is the base output."""
    base, x = layer("efficientformer")
    x = x[:1]
    with torch.no_grad():
        base.attention_biases.zero_()
        expected = base(x)
        adapter = inject(nn.ModuleDict({"attn": base}), PrefixTuning(num_tokens=49))["attn"]
        _, k, v = base.qkv(x).view(1, 49, base.num_heads, -1).split([base.key_dim, base.key_dim, base.val_dim], -1)
        adapter.prefix_keys.copy_(k[0].transpose(0, 1))  # (h, n, d_k)
        adapter.prefix_values.copy_(v[0].transpose(0, 1))
        got = adapter(x)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_attention_layer_of_the_model_is_found(name: str) -> None:
    net = model(name)
    expected = [n for n, m in net.named_modules() if type(m).__name__ in ("Attention", "AttentionDownsample")]
    found = find_attention(net)
    assert [n for n, _ in found] == expected
    adapter = "SdpaPrefixAttention" if "tiny_vit" in name else "BiasTablePrefixAttention"  # TinyViT calls SDPA
    assert {match.adapter.__name__ for _, match in found} == {adapter}

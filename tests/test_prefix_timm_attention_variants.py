"""Prefix tuning on timm's BEiT, EVA, PVTv2, CoAtNet and MaxViT attention, checked numerically: one layer inside a
tiny model against a written-out softmax over ``[prefix; keys]`` (relative-position bias on the real columns only,
RoPE not on the prefix), disabled and gated adapters against the base model, gradients; EdgeNeXt refused."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_checks import nondegenerate

from lightning_peft import PrefixTuning, adapters, adapters_disabled, inject
from lightning_peft.errors import TargetNotFoundError
from lightning_peft.prefix.attention import PrefixAttention

timm = pytest.importorskip("timm")
P = 3
TOL = dict(atol=1e-10, rtol=1e-10)  # float64 throughout (models kept small: float64 convolutions are slow)

_BEIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
_PVT = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 64), num_heads=(1, 2, 2, 2))
_MAXXVIT = dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), stem_width=(16, 32),
                transformer_dim_head=16)
#: family -> (timm model, its kwargs, image size)
MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "beit": ("beit_base_patch16_224", _BEIT, 32),  # a relative-position table per layer, q/v biases
    "beit-shared": ("beit_base_patch16_224", dict(_BEIT, use_rel_pos_bias=False, use_shared_rel_pos_bias=True), 32),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),  # fused qkv, rope, one class token
    "eva-separate": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, qkv_fused=False, qk_norm=True,
                                                    scale_attn_inner=True, num_reg_tokens=1), 28),
    "pvt_v2": ("pvt_v2_b0", _PVT, 64),  # sr conv + norm (stage 1: 8x8 queries, 2x2 keys)
    "pvt_v2-linear": ("pvt_v2_b0", dict(_PVT, linear=True), 64),  # pool to 7x7, 1x1 conv, norm, GELU
    "coatnet": ("coatnet_nano_rw_224", _MAXXVIT, 64),  # Attention2d (NCHW) in stages 2 and 3
    "maxvit": ("maxvit_nano_rw_256", _MAXXVIT, 64),  # AttentionCl on windows and grids
}
ATTENTION = {"Attention", "EvaAttention", "Attention2d", "AttentionCl"}  # timm class names: random weights


def build(family: str) -> nn.Module:
    """A tiny float64 model whose attention parameters (zero-initialised biases, rel-pos tables) are random."""
    name, kwargs, _ = MODELS[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in ATTENTION or type(module).__name__.startswith("RelPos"):
                for name, param in module.named_parameters():
                    if "norm" not in name:
                        param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2)
    return model


def images(family: str) -> torch.Tensor:
    size = MODELS[family][2]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)


def prefix_adapters(model: nn.Module) -> list[PrefixAttention]:
    return [a for _, a in adapters(model) if isinstance(a, PrefixAttention)]


def capture(module: nn.Module) -> dict[str, Any]:
    """The arguments ``module`` receives (bound to its forward's names) and its output, on its next calls."""
    seen: dict[str, Any] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        forward = getattr(mod, "base_layer", mod).forward  # the adapter takes what its base takes
        seen.setdefault("call", inspect.signature(forward).bind(*args, **kwargs).arguments)
        seen.setdefault("output", output)

    module.register_forward_hook(hook, with_kwargs=True)
    return seen


def over_prefix_and_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adapter: PrefixAttention,
                         bias: torch.Tensor | float, scale: float) -> torch.Tensor:
    """Written out: scores ``(b, h, n, p + m)`` = [q P_k^T, q k^T + bias]·…, one softmax, weights [P_v; v]."""
    pk, pv = adapter.prefix_keys[None], adapter.prefix_values[None]  # (1, h, p, d): every batch row, every window
    scores = torch.cat([q @ pk.transpose(-1, -2) * scale, q @ k.transpose(-1, -2) * scale + bias], dim=-1)
    assert scores.shape[-1] == P + k.shape[-2]
    return scores.softmax(-1) @ torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], dim=-2)


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``(b, n, h·d)`` -> ``(b, h, n, d)``."""
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def table_bias(table: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``(1, h, n, n)`` from a relative-position table ``(distances, h)`` and its index (``(n, n)`` or flat)."""
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)[None]


def beit_reference(adapter: PrefixAttention, call: dict[str, Any]) -> torch.Tensor:
    attn, x = adapter.base_layer, call["x"]
    h = attn.num_heads
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])  # BEiT: no key bias
    q, k, v = (heads(t, h) for t in (x @ attn.qkv.weight.T + bias).chunk(3, dim=-1))
    own = attn.relative_position_bias_table
    rel = table_bias(own, attn.relative_position_index, x.shape[1]) if own is not None else 0.0
    shared = call.get("shared_rel_pos_bias")
    assert (own is None) != (shared is None)  # the two families: one table per layer, or one for the model
    out = over_prefix_and_keys(q, k, v, adapter, rel + (0.0 if shared is None else shared), attn.scale)
    return attn.proj(merge_heads(out))


def rope(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """timm's interleaved RoPE: ``x·cos + rot(x)·sin`` with ``rot([x0, x1, …]) = [-x1, x0, …]``."""
    sin, cos = emb.chunk(2, dim=-1)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def eva_reference(adapter: PrefixAttention, call: dict[str, Any]) -> torch.Tensor:
    attn, x = adapter.base_layer, call["x"]
    h, npt = attn.num_heads, attn.num_prefix_tokens
    if attn.qkv is not None:
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = (heads(t, h) for t in (x @ attn.qkv.weight.T + bias).chunk(3, dim=-1))
    else:
        q, k, v = heads(attn.q_proj(x), h), heads(attn.k_proj(x), h), heads(attn.v_proj(x), h)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # patch tokens rotated, class/register tokens and the prefix not
    q = torch.cat([q[:, :, :npt], rope(q[:, :, npt:], call["rope"])], dim=2)
    k = torch.cat([k[:, :, :npt], rope(k[:, :, npt:], call["rope"])], dim=2)
    mask = call.get("attn_mask")  # bool, True = attend: -inf on the real columns it hides
    bias = 0.0 if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    return attn.proj(attn.norm(merge_heads(over_prefix_and_keys(q, k, v, adapter, bias, attn.scale))))


def pvt_reference(adapter: PrefixAttention, call: dict[str, Any]) -> torch.Tensor:
    attn, x = adapter.base_layer, call["x"]
    (b, n, c), h = x.shape, attn.num_heads
    grid = x.transpose(1, 2).reshape(b, c, *call["feat_size"])
    if attn.pool is not None:  # linear variant: 7x7 average pool, 1x1 conv, LayerNorm, GELU
        reduced = F.gelu(attn.norm(attn.sr(F.adaptive_avg_pool2d(grid, 7)).flatten(2).transpose(1, 2)))
    else:  # sr x sr convolution with stride sr, LayerNorm
        reduced = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))
    assert reduced.shape[1] < n  # keys and values come from fewer positions than the queries
    k, v = (heads(t, h) for t in attn.kv(reduced).chunk(2, dim=-1))
    return attn.proj(merge_heads(over_prefix_and_keys(heads(attn.q(x), h), k, v, adapter, 0.0, attn.scale)))


def rel_pos_bias(attn: nn.Module, n: int) -> torch.Tensor:
    rel = attn.rel_pos
    return table_bias(rel.relative_position_bias_table, rel.relative_position_index, n)


def attention2d_reference(adapter: PrefixAttention, call: dict[str, Any]) -> torch.Tensor:
    attn, x = adapter.base_layer, call["x"]
    b, _, height, width = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (b, H·W, c): the 1x1 conv is a linear map per position
    fused = tokens @ attn.qkv.weight.flatten(1).T + attn.qkv.bias  # head-first: per head [q_h, k_h, v_h]
    q, k, v = fused.view(b, height * width, attn.num_heads, 3, attn.dim_head).permute(3, 0, 2, 1, 4)
    out = over_prefix_and_keys(q, k, v, adapter, rel_pos_bias(attn, height * width), attn.scale)  # (b, h, H·W, d)
    return attn.proj(merge_heads(out).transpose(1, 2).reshape(b, -1, height, width))


def attention_cl_reference(adapter: PrefixAttention, call: dict[str, Any]) -> torch.Tensor:
    attn, x = adapter.base_layer, call["x"]  # (windows, wh, ww, c): each window a batch row
    tokens = x.flatten(1, 2)
    fused = attn.qkv(tokens).view(*tokens.shape[:2], attn.num_heads, 3, attn.dim_head)
    q, k, v = fused.permute(3, 0, 2, 1, 4)
    out = over_prefix_and_keys(q, k, v, adapter, rel_pos_bias(attn, tokens.shape[1]), attn.scale)
    return attn.proj(merge_heads(out)).view(*x.shape[:-1], -1)


#: reference and adapter class per kind (a family's name up to its "-": "eva-separate" is an "eva")
REFERENCES: dict[str, Callable[[PrefixAttention, dict[str, Any]], torch.Tensor]] = {
    "beit": beit_reference, "eva": eva_reference, "pvt_v2": pvt_reference, "coatnet": attention2d_reference,
    "maxvit": attention_cl_reference,
}
ADAPTERS = {"beit": "SdpaPrefixAttention", "eva": "SdpaPrefixAttention", "pvt_v2": "SdpaPrefixAttention",
            "coatnet": "SdpaPrefixAttention", "maxvit": "SdpaPrefixAttention"}
LAYER = {"pvt_v2": 1, "pvt_v2-linear": 1}  # stage 1 (PVTv2's last stage attends without reduction)


@pytest.mark.parametrize("family", list(MODELS))
def test_layer_equals_written_out_softmax_over_prefix_and_keys(family: str) -> None:
    kind = family.partition("-")[0]
    model = inject(build(family), PrefixTuning(num_tokens=P))
    found = prefix_adapters(model)
    assert found and {type(a).__name__ for a in found} == {ADAPTERS[kind]}
    adapter = found[LAYER.get(family, -1)]  # its input went through prefixed layers already
    seen = capture(adapter)
    with torch.no_grad():
        model(images(family))
        expected = REFERENCES[kind](adapter, seen["call"])
    got = seen["output"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    print(f"{family}: max |adapter - reference| = {(got - expected).abs().max().item():.2e}")


def test_eva_mask_hides_real_keys_and_never_the_prefix() -> None:
    model = inject(build("eva"), PrefixTuning(num_tokens=P))
    adapter = prefix_adapters(model)[0]
    seen = capture(adapter)
    with torch.no_grad():
        model(images("eva"))
        call = dict(seen["call"])
        n = call["x"].shape[1]
        call["attn_mask"] = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(3)) > 0.3
        call["attn_mask"][..., 0] = True  # every query keeps one real key (the class token)
        got = adapter(call["x"], rope=call["rope"], attn_mask=call["attn_mask"])
        torch.testing.assert_close(got, eva_reference(adapter, call), **TOL)


def test_maxvit_windows_and_grids_each_see_the_layer_prefix() -> None:
    model = inject(build("maxvit"), PrefixTuning(num_tokens=P))
    block = model.stages[0].blocks[0]
    window, grid = block.attn_block.attn, block.attn_grid.attn
    seen = [capture(window), capture(grid)]
    with torch.no_grad():
        model(images("maxvit"))
    for adapter, got in zip((window, grid), seen, strict=True):
        assert got["call"]["x"].shape[0] > 2  # windows are batch rows: more rows than images
        torch.testing.assert_close(got["output"], attention_cl_reference(adapter, got["call"]), **TOL)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("gate", [False, True])
def test_disabled_adapters_and_a_fresh_gate_reproduce_the_base_model(family: str, gate: bool) -> None:
    base = build(family)
    with torch.no_grad():
        expected = base(images(family))
    model = inject(copy.deepcopy(base), PrefixTuning(num_tokens=P, gate=gate))
    with torch.no_grad():
        moved = model(images(family))
        with adapters_disabled(model):
            disabled = model(images(family))
    torch.testing.assert_close(disabled, expected, atol=1e-6, rtol=0)
    if gate:  # tanh(0) = 0: the prefix branch adds nothing until the gate moves
        torch.testing.assert_close(moved, expected, atol=1e-6, rtol=0)
    else:
        assert (moved - expected).abs().max() > 1e-6


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("gate", [False, True])
def test_gradients_reach_every_prefix_and_nothing_of_the_base(family: str, gate: bool) -> None:
    model = inject(build(family), PrefixTuning(num_tokens=P, gate=gate))
    if gate:  # a zero gate passes no gradient to the prefix: open it a little
        for adapter in prefix_adapters(model):
            torch.nn.init.constant_(adapter.prefix_gate, 0.5)
    model(images(family)).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in ("prefix_keys", "prefix_values", "prefix_gate")
                             for n in trainable)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_edgenext_cross_covariance_attention_is_refused_with_the_reason_and_the_fix() -> None:
    model = timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10)
    with pytest.raises(TargetNotFoundError, match=r"attends over channels, not tokens.*Use LoRA .* or PromptTuning"):
        inject(model, PrefixTuning(num_tokens=P))


#: timm models whose prefix layers apply the base's attention dropout (SDPA's dropout_p; the Swin adapters' attn_drop.p), built
#: with attn_drop_rate=0.5 and no other dropout: a prefix layer that ignored it would give equal train-mode calls
DROPOUT_MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=4, embed_dim=32, depths=(2, 2),
                                                  num_heads=(2, 4)), 32),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, window_size=4, embed_dim=32, depths=(2, 2),
                                               num_heads=(2, 4)), 32),
    **{family: MODELS[family] for family in ("beit", "eva", "pvt_v2")},
}


@pytest.mark.parametrize("family", list(DROPOUT_MODELS))
def test_prefix_layers_apply_the_base_attention_dropout_in_training_only(family: str) -> None:
    name, kwargs, size = DROPOUT_MODELS[family]
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=10, attn_drop_rate=0.5, drop_path_rate=0.0, **kwargs)
    model = inject(nondegenerate(base), PrefixTuning(num_tokens=P))  # Swin-V2's zero post-norms hide attention
    layers = prefix_adapters(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))  # attention weights dropped at random, every call
    with adapters_disabled(model), torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # the base itself (the reference behaviour)
    assert layers and all(float(layer.base_layer.attn_drop.p) == 0.5 for layer in layers)

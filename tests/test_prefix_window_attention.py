"""Prefix tuning on Swin window attention (torchvision ``ShiftedWindowAttention`` v1/v2, timm ``WindowAttention``
v1/v2), checked numerically: one layer, shifted windows and padded maps included, against a written-out softmax
per window over ``[prefix; window keys]`` (relative position bias and shift mask on the real columns only); the
disabled adapter against the base; gradients; the gate's exact start; injection and a save/load round trip."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from attention_checks import capture
from torch import nn
from zoo_checks import nondegenerate

from lightning_peft import PrefixTuningConfig, adapters_disabled, inject, load_adapter, save_adapter
from lightning_peft.prefix.attention import PrefixAttention

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision.models.swin_transformer")
P = 3
TOL = dict(atol=1e-10, rtol=1e-10)  # float64 throughout
SWIN = ["torchvision", "torchvision_v2", "timm", "timm_v2"]
FAMILIES = [*SWIN, "torchvision_maxvit"]
BASE_CLASSES = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2", "WindowAttention",
                "RelativePositionalMultiHeadAttention")


def tiny(family: str) -> nn.Module:
    """Two stages of two blocks (the second of stage 0 shifted), window 4, 8x8 feature map at 32x32, float64.

    Zero-initialised weights get small values (timm v2's res-post-norms start at zero, hiding the attention).
    torchvision MaxViT: two stages of one block (window then grid attention each), partition 2, 8x8 then 4x4."""
    torch.manual_seed(0)
    if family == "torchvision_maxvit":
        from torchvision.models.maxvit import MaxVit

        model = MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
                       block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    elif family.startswith("torchvision"):
        v2 = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if family.endswith("v2") else {}
        model = tv.SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=10, **v2)
    else:
        name = "swinv2_tiny_window8_256" if family.endswith("v2") else "swin_tiny_patch4_window7_224"
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=32, window_size=4,
                                  embed_dim=32, depths=(2, 2), num_heads=(2, 4))
    return nondegenerate(model.double()).eval()


def images(height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def prefix_layers(model: nn.Module) -> list[PrefixAttention]:
    return [m for m in model.modules() if isinstance(m, PrefixAttention)]


def softmax_over_prefix_and_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor,
                                   pv: torch.Tensor, bias: torch.Tensor, logit_scale: torch.Tensor | None
                                   ) -> torch.Tensor:
    """One window, written out: ``q, k, v (h, N, d)``, prefix ``(h, p, d)``, real-key bias ``(h, N, N)``.

    Scores ``(h, N, p + N)`` = ``[q P_k^T, q k^T]`` scaled (cosine: normalised vectors times the clamped logit
    scale) plus ``[0, bias]``; one softmax weights ``[P_v; v]``."""
    if logit_scale is None:
        scale: torch.Tensor | float = q.shape[-1] ** -0.5
    else:
        # as F.normalize: a zero key (a padded token of v2, whose key has no bias) stays zero
        q, k, pk = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) for x in (q, k, pk))
        scale = logit_scale.clamp(max=math.log(100.0)).exp()
    scores = torch.cat([q @ pk.transpose(-1, -2) * scale, q @ k.transpose(-1, -2) * scale + bias], dim=-1)
    assert scores.shape[-2:] == (q.shape[1], P + k.shape[1])
    return scores.softmax(-1) @ torch.cat([pv, v], dim=-2)


def heads(x: torch.Tensor, h: int) -> list[torch.Tensor]:
    """``(N, 3·C)`` fused projections → q, k, v ``(h, N, C/h)``."""
    return [part.reshape(x.shape[0], h, -1).transpose(0, 1) for part in x.chunk(3, dim=-1)]


def torchvision_reference(adapter: PrefixAttention, x: torch.Tensor) -> torch.Tensor:
    """The whole layer, one window at a time: pad, roll by the shift, attend per window, unroll, crop."""
    attn, cosine = adapter.base_layer, type(adapter.base_layer).__name__.endswith("V2")
    b, height, width, c = x.shape
    (wh, ww), h = attn.window_size, attn.num_heads
    x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
    ph, pw = x.shape[1:3]
    s = [attn.shift_size[0] if wh < ph else 0, attn.shift_size[1] if ww < pw else 0]
    x = torch.roll(x, (-s[0], -s[1]), dims=(1, 2))
    weight, qkv_bias = attn.qkv.weight, attn.qkv.bias.clone()
    if cosine:
        qkv_bias[c:2 * c] = 0  # v2: no key bias
    # shifted windows: tokens that wrapped around (last s rows/columns) and those that did not never meet
    rows, cols = torch.arange(ph) >= ph - s[0] if s[0] else torch.zeros(ph, dtype=torch.bool), \
        torch.arange(pw) >= pw - s[1] if s[1] else torch.zeros(pw, dtype=torch.bool)
    relative = attn.get_relative_position_bias()[0]  # (h, N, N)
    out = torch.zeros_like(x)
    for i in range(ph // wh):
        for j in range(pw // ww):
            part = (slice(i * wh, (i + 1) * wh), slice(j * ww, (j + 1) * ww))
            region = torch.stack(torch.meshgrid(rows[part[0]], cols[part[1]], indexing="ij")).reshape(2, -1)
            apart = (region[:, :, None] != region[:, None, :]).any(0)
            bias = relative + torch.zeros(apart.shape, dtype=x.dtype).masked_fill(apart, -100.0)
            for n in range(b):
                q, k, v = heads(x[n, part[0], part[1]].reshape(wh * ww, c) @ weight.T + qkv_bias, h)
                o = softmax_over_prefix_and_window(q, k, v, adapter.prefix_keys, adapter.prefix_values, bias,
                                                   attn.logit_scale if cosine else None)
                o = o.transpose(0, 1).reshape(wh * ww, c) @ attn.proj.weight.T + attn.proj.bias
                out[n, part[0], part[1]] = o.reshape(wh, ww, c)
    return torch.roll(out, (s[0], s[1]), dims=(1, 2))[:, :height, :width]


def timm_reference(adapter: PrefixAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """timm gets the windows ``(B·nW, N, C)`` and the block's shift mask ``(nW, N, N)``: one window at a time."""
    attn, cosine = adapter.base_layer, hasattr(adapter.base_layer, "logit_scale")
    n = x.shape[1]
    if cosine:  # continuous position bias: an MLP of log-spaced relative coordinates, 16·sigmoid
        table = attn.cpb_mlp(attn.relative_coords_table).reshape(-1, attn.num_heads)
        relative = 16 * torch.sigmoid(table[attn.relative_position_index.reshape(-1)].reshape(n, n, -1))
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:
        table = attn.relative_position_bias_table
        relative = table[attn.relative_position_index.reshape(-1)].reshape(n, n, -1)
        qkv_bias = attn.qkv.bias
    relative = relative.permute(2, 0, 1)
    out = []
    for w, tokens in enumerate(x):
        bias = relative + (mask[w % mask.shape[0]] if mask is not None else 0.0)
        q, k, v = heads(tokens @ attn.qkv.weight.T + qkv_bias, attn.num_heads)
        o = softmax_over_prefix_and_window(q, k, v, adapter.prefix_keys, adapter.prefix_values, bias,
                                           attn.logit_scale if cosine else None)
        out.append(o.transpose(0, 1).reshape(n, -1) @ attn.proj.weight.T + attn.proj.bias)
    return torch.stack(out)


# torchvision pads a map the windows do not tile (36x28 images: 9x7 features, padded to 12x8); timm models take
# their declared image size only
SIZES = [(family, (32, 32)) for family in SWIN] + [("torchvision", (36, 28)), ("torchvision_v2", (36, 28))]


@pytest.mark.parametrize("family,size", SIZES)
@pytest.mark.parametrize("layer", [0, 1], ids=["windows", "shifted"])
def test_layer_equals_written_out_softmax_over_prefix_and_window_keys(family: str, layer: int,
                                                                      size: tuple[int, int]) -> None:
    model = inject(tiny(family), PrefixTuningConfig(num_tokens=P))
    adapter = prefix_layers(model)[layer]  # stage 0: block 0 plain windows, block 1 shifted by 2
    seen = capture(adapter)
    with torch.no_grad():
        model(images(*size))
        if family.startswith("torchvision"):
            x = seen["args"][0]
            assert (x.shape[1] % 4 != 0) == (size == (36, 28))
            expected = torchvision_reference(adapter, x)
        else:
            mask = seen["kwargs"]["mask"]
            assert (mask is not None) == (layer == 1)
            expected = timm_reference(adapter, seen["args"][0], mask)
    got = seen["output"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)
    print(f"{family} layer {layer} {size}: max |adapter - reference| = {(got - expected).abs().max():.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_adapters_give_the_base_model_and_the_prefix_changes_it(family: str) -> None:
    base = tiny(family)
    model = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=P))
    x = images()
    with torch.no_grad():
        reference = base(x)
        with adapters_disabled(model):
            disabled = model(x)
        adapted = model(x)
    torch.testing.assert_close(disabled, reference, atol=1e-12, rtol=0)
    assert (adapted - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_prefix_and_nothing_of_the_frozen_base(family: str) -> None:
    model = inject(tiny(family), PrefixTuningConfig(num_tokens=P))
    model(images()).square().sum().backward()
    adapters = prefix_layers(model)
    for adapter in adapters:
        for tensor in (adapter.prefix_keys, adapter.prefix_values):
            assert tensor.grad is not None and tensor.grad.abs().max() > 0
    trainable = {id(t) for a in adapters for t in (a.prefix_keys, a.prefix_values)}
    assert all(p.grad is None and not p.requires_grad for p in model.parameters() if id(p) not in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_gated_prefix_starts_as_the_base_model_and_moves_once_the_gate_opens(family: str) -> None:
    base = tiny(family)
    model = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=P, gate=True))
    x = images()
    with torch.no_grad():
        reference = base(x)
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)
        for adapter in prefix_layers(model):
            assert adapter.prefix_gate is not None
            adapter.prefix_gate.fill_(0.5)
        assert (model(x) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_adapts_every_window_attention_and_reloads_exactly(family: str, tmp_path: Path) -> None:
    base = tiny(family)
    attention = [n for n, m in base.named_modules() if type(m).__name__ in BASE_CLASSES]
    model = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=P))
    adapted = {n for n, m in model.named_modules() if isinstance(m, PrefixAttention)}
    assert adapted == set(attention) and len(attention) == 4
    with torch.no_grad():
        for adapter in prefix_layers(model):  # as if trained
            adapter.prefix_keys.add_(0.1)
        expected = model(images())
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
    for old, new in zip(prefix_layers(model), prefix_layers(reloaded), strict=True):
        assert torch.equal(old.prefix_keys, new.prefix_keys) and torch.equal(old.prefix_values, new.prefix_values)
    with torch.no_grad():
        assert torch.equal(reloaded(images()), expected)


def maxvit_reference(adapter: PrefixAttention, x: torch.Tensor) -> torch.Tensor:
    """torchvision MaxViT attention written out, group by group of ``x (B, G, P, D)``: per head, scores over
    ``[prefix; the group's P keys]`` at torchvision's scale ``D ** -0.5``, the relative bias on real keys only."""
    attn = adapter.base_layer
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    bias = bias.view(x.shape[2], x.shape[2], -1).permute(2, 0, 1)  # (h, P, P)
    scale = x.shape[-1] ** -0.5
    out = torch.empty_like(x)
    for b, g in itertools.product(range(x.shape[0]), range(x.shape[1])):
        q, k, v = heads(x[b, g] @ attn.to_qkv.weight.T + attn.to_qkv.bias, attn.n_heads)
        scores = torch.cat([q @ adapter.prefix_keys.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1) * scale
        scores = scores + F.pad(bias, (P, 0))
        mixed = scores.softmax(dim=-1) @ torch.cat([adapter.prefix_values, v], dim=-2)  # (h, P, d)
        out[b, g] = mixed.transpose(0, 1).reshape(x.shape[2], -1) @ attn.merge.weight.T + attn.merge.bias
    return out


@pytest.mark.parametrize("layer", [0, 1, 2, 3], ids=["windows", "grid", "stage1-windows", "stage1-grid"])
def test_torchvision_maxvit_layer_equals_written_out_softmax_over_prefix_and_group(layer: int) -> None:
    model = inject(tiny("torchvision_maxvit"), PrefixTuningConfig(num_tokens=P))
    adapter = prefix_layers(model)[layer]
    seen = capture(adapter)
    with torch.no_grad():
        model(images())
        x = seen["args"][0]
        expected = maxvit_reference(adapter, x)
    assert x.dim() == 4 and x.shape[1] > 1  # several groups, each attending over the prefix and itself only
    torch.testing.assert_close(seen["output"], expected, **TOL)
    print(f"maxvit layer {layer} {tuple(x.shape)}: max |adapter - reference| = "
          f"{(seen['output'] - expected).abs().max():.2e}")

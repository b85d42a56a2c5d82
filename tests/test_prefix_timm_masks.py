"""Prefix tuning on timm's ``Attention`` with masks: bool (True attends), additive float, ``is_causal`` and none,
checked against attention written out by hand; rows the token mask blocks fully; and the disabled adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_peft import PrefixTuningConfig, adapter_state_dict, adapters_disabled, inject
from lightning_peft.errors import ParticipationError
from lightning_peft.prefix.attention.sdpa import SdpaPrefixAttention

timm_attention = pytest.importorskip("timm.layers.attention")

TOL = dict(atol=1e-5, rtol=1e-4)
B, N, DIM, HEADS, P = 2, 5, 16, 2, 3  # batch, tokens, width, heads, prefix length
HEAD_DIM = DIM // HEADS


def adapted_attention() -> tuple[nn.Module, SdpaPrefixAttention, torch.Tensor, torch.Tensor]:
    """A random timm ``Attention`` (eval), its prefix adapter, and the known prefix keys/values written into it."""
    torch.manual_seed(0)
    base = timm_attention.Attention(DIM, num_heads=HEADS, qkv_bias=True).eval()
    model = inject(nn.Sequential(copy.deepcopy(base)), PrefixTuningConfig(num_tokens=P))
    adapter = model[0]
    assert isinstance(adapter, SdpaPrefixAttention)
    assert list(adapter_state_dict(model)) == ["0.prefix_keys", "0.prefix_values"]
    keys, values = torch.randn(HEADS, P, HEAD_DIM) * 2, torch.randn(HEADS, P, HEAD_DIM) * 2  # (h, p, d)
    with torch.no_grad():
        adapter.prefix_keys.copy_(keys)
        adapter.prefix_values.copy_(values)
    return base, adapter, keys, values


def bool_mask() -> torch.Tensor:
    """``(b, 1, n, n)``, True = attend; a different pattern per sample, no row fully blocked."""
    mask = torch.ones(B, 1, N, N, dtype=torch.bool)
    mask[0, 0, :, -2:] = False  # sample 0: last two keys padded away
    mask[1, 0, 1, 0] = mask[1, 0, 3, 2] = mask[1, 0, 4, 1] = False  # sample 1: scattered holes
    return mask


def float_mask() -> torch.Tensor:
    """``(b, h, n, n)`` additive mask: random biases per head, some ``-inf`` (never a whole row)."""
    mask = torch.randn(B, HEADS, N, N, generator=torch.Generator().manual_seed(1))
    mask[0, 0, :, 0] = mask[1, 1, 2, 1:] = float("-inf")
    return mask


def written_out(attn: nn.Module, keys: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Prefix attention by hand: prefix keys/values in front, ``bias`` (real keys only) padded with 0 for them."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # (b, h, n, d) each
    k = torch.cat([keys.expand(b, -1, -1, -1), k], dim=2)  # (b, h, p + n, d)
    v = torch.cat([values.expand(b, -1, -1, -1), v], dim=2)
    scores = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5  # (b, h, n, p + n)
    if bias is not None:
        scores = scores + torch.cat([torch.zeros(b, HEADS, n, P), bias.expand(b, HEADS, n, n)], dim=-1)
    out = scores.softmax(-1) @ v  # (b, h, n, d)
    return attn.proj(out.transpose(1, 2).reshape(b, n, DIM))


def hand_bias(kind: str) -> torch.Tensor | None:
    """The additive mask over the real keys that each case means, built without the library's helpers."""
    minus_inf = torch.tensor(float("-inf"))
    if kind == "bool":
        return torch.where(bool_mask(), torch.tensor(0.0), minus_inf)
    if kind == "float":
        return float_mask()
    if kind == "is_causal":
        return torch.where(torch.ones(N, N, dtype=torch.bool).tril(), torch.tensor(0.0), minus_inf)
    return None


def call_kwargs(kind: str) -> dict[str, torch.Tensor | bool]:
    return {"bool": {"attn_mask": bool_mask()}, "float": {"attn_mask": float_mask()},
            "is_causal": {"is_causal": True}, "none": {}}[kind]


@pytest.mark.parametrize("kind", ["bool", "float", "is_causal", "none"])
def test_masked_prefix_attention_equals_written_out(kind: str) -> None:
    """Every query sees all prefix columns; the mask (or causality) applies to the real keys only."""
    _, adapter, keys, values = adapted_attention()
    x = torch.randn(B, N, DIM)
    with torch.no_grad():
        got = adapter(x, **call_kwargs(kind))
        expected = written_out(adapter.base_layer, keys, values, x, hand_bias(kind))
        unmasked = written_out(adapter.base_layer, keys, values, x, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **TOL)
    if kind != "none":  # the mask must matter, or the comparison above proves nothing about it
        assert (got - unmasked).abs().max() > 1e-3


def test_bool_mask_is_not_inverted() -> None:
    """timm and SDPA read True as *attend*: blocking key 0 everywhere must change only what key 0 contributed."""
    _, adapter, keys, values = adapted_attention()
    x = torch.randn(B, N, DIM)
    mask = torch.ones(B, 1, N, N, dtype=torch.bool)
    mask[..., 0] = False
    with torch.no_grad():
        got = adapter(x, attn_mask=mask)
        dropped = written_out(adapter.base_layer, keys, values, x[:, 1:], None)  # key 0 gone = token 0 gone
    torch.testing.assert_close(got[:, 1:], dropped, **TOL)  # queries 1.. never saw token 0's key


def test_fully_blocked_query_row_still_attends_to_the_prefix() -> None:
    """A query whose token-mask row is all False attends to the prefix alone: finite, not NaN."""
    base, adapter, keys, values = adapted_attention()
    x = torch.randn(B, N, DIM)
    mask = bool_mask()
    mask[0, 0, 2] = False  # sample 0, query 2: no real key at all
    with torch.no_grad():
        got = adapter(x, attn_mask=mask)
        expected = written_out(adapter.base_layer, keys, values, x, torch.where(mask, 0.0, float("-inf")))
        base.fused_attn = False
        frozen = base(x, attn_mask=mask)
        # the row by hand: softmax over the prefix keys only, then the prefix values
        q = adapter.base_layer.qkv(x[0, 2]).reshape(3, HEADS, HEAD_DIM)[0]  # (h, d)
        weights = (q[:, None] @ keys.transpose(-1, -2) * HEAD_DIM ** -0.5).softmax(-1)  # (h, 1, p)
        row = adapter.base_layer.proj((weights @ values).reshape(DIM))
    assert torch.isnan(frozen[0, 2]).all()  # without a prefix the row has nothing to attend to
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(got[0, 2], row, **TOL)


@pytest.mark.parametrize("kind", ["bool", "float", "is_causal"])
def test_disabled_adapter_equals_timm_attention_with_the_same_mask(kind: str) -> None:
    """Switched off, the adapter is timm's ``Attention``, masks and all; switched on again, the prefix is back."""
    base, adapter, _, _ = adapted_attention()
    x = torch.randn(B, N, DIM)
    with torch.no_grad():
        enabled = adapter(x, **call_kwargs(kind))
        with adapters_disabled(adapter):
            disabled = adapter(x, **call_kwargs(kind))
        expected = base(x, **call_kwargs(kind))
    torch.testing.assert_close(disabled, expected, **TOL)
    assert (enabled - expected).abs().max() > 1e-3  # the prefix is back on after the context
    assert adapter.enabled


def test_timm_explicit_path_switched_on_after_inject_raises_instead_of_dropping_the_prefix() -> None:
    """timm's ``fused_attn = False`` computes scores without SDPA, where the prefix enters: the forward raises."""
    _, adapter, _, _ = adapted_attention()
    adapter.base_layer.fused_attn = False
    with pytest.raises(ParticipationError, match="without calling F.scaled_dot_product_attention"):
        adapter(torch.randn(B, N, DIM))


def test_a_mask_with_is_causal_is_refused_as_timm_refuses_it() -> None:
    """timm's fused path passes both to SDPA, which refuses them together; with the prefix it still does."""
    base, adapter, _, _ = adapted_attention()
    x = torch.randn(B, N, DIM)
    with pytest.raises(RuntimeError, match="attn_mask"):
        base(x, attn_mask=bool_mask(), is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        adapter(x, attn_mask=bool_mask(), is_causal=True)

"""Prefix tuning for any attention module that calls F.scaled_dot_product_attention (prefix/attention/sdpa.py):
outputs against softmax over [prefix; keys] written out in float64, GQA, masks, training, the gate, the
refusals and the participation check."""

from __future__ import annotations

import copy
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import multi_head_attention_forward
from torch.nn.functional import scaled_dot_product_attention as fused_attention

from lightning_peft import (
    LoRAConfig,
    ParticipationError,
    PrefixTuningConfig,
    TargetNotFoundError,
    adapters,
    adapters_disabled,
    inject,
    load_adapter,
    save_adapter,
)
from lightning_peft.prefix.attention import (
    _HANDLERS,
    MultiheadPrefixAttention,
    SdpaPrefixAttention,
    match_attention,
)
from lightning_peft.prefix.attention.sdpa import sdpa_shape

TOL = dict(atol=1e-5, rtol=0.0)  # float64: the adapted path and the written-out formula agree far below this
P, B, N = 4, 2, 6


class MyAttention(nn.Module):
    """A user's attention: fused qkv, ``num_heads`` and ``dim`` attributes, F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 8, num_heads: int = 2) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape  # (b, n, 3·dim) -> 3 x (b, h, n, d)
        return tuple(self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = self.heads(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).flatten(2))


class GQAttention(nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads, by repeat_interleave or enable_gqa."""

    def __init__(self, enable_gqa: bool, dim: int = 16) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.enable_gqa = 4, 2, 4, enable_gqa
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, 16), nn.Linear(dim, 8), nn.Linear(dim, 8)
        self.o_proj = nn.Linear(16, dim)

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, 4, 4).transpose(1, 2)
        k, v = (proj(x).view(b, n, 2, 4).transpose(1, 2) for proj in (self.k_proj, self.v_proj))
        if not self.enable_gqa:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.enable_gqa)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Net(nn.Module):
    def __init__(self, attention: nn.Module | None = None, dim: int = 8) -> None:
        super().__init__()
        self.attn, self.head = attention or MyAttention(dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.head(self.attn(x, **kwargs))


def adapted(base: nn.Module, **config: object) -> tuple[nn.Module, SdpaPrefixAttention]:
    model = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=P, **config))  # type: ignore[arg-type]
    adapter = model.attn
    assert isinstance(adapter, SdpaPrefixAttention)
    return model, adapter


def softmax_over_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·[P_k; K]ᵀ/√d + [0 | bias])·[P_v; V], per head; ``bias`` additive over the real keys."""
    keys = torch.cat([pk.expand(q.shape[0], -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], dim=2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + F.pad(bias.expand(*bias.shape[:-1], k.shape[2]), (pk.shape[-2], 0))
    return scores.softmax(-1) @ values


def masks(kind: str) -> tuple[dict[str, object], torch.Tensor | None]:
    """The module's keyword arguments, and the same mask written as an additive bias over the real keys."""
    generator = torch.Generator().manual_seed(3)
    if kind == "none":
        return {}, None
    if kind == "causal":
        return {"causal": True}, torch.zeros(N, N, dtype=torch.float64).masked_fill(
            torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    if kind == "additive_padding":  # (b, 1, 1, s): the last two keys of the first sample are padding
        padding = torch.zeros(B, 1, 1, N, dtype=torch.float64)
        padding[0, ..., -2:] = -math.inf
        return {"mask": padding}, padding
    if kind == "additive_per_head":
        bias = torch.randn(B, 2, N, N, generator=generator, dtype=torch.float64)
        return {"mask": bias}, bias
    keep = torch.rand(N, N, generator=generator) > 0.4  # bool: True attends
    keep.fill_diagonal_(True)
    return {"mask": keep}, torch.zeros(N, N, dtype=torch.float64).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("kind", ["none", "causal", "additive_padding", "additive_per_head", "bool"])
def test_users_sdpa_attention_equals_softmax_over_prefix_and_keys(kind: str) -> None:
    torch.manual_seed(0)
    base = Net().double()
    model, adapter = adapted(base)
    kwargs, bias = masks(kind)
    x = torch.randn(B, N, 8, dtype=torch.float64)
    attn = adapter.base_layer
    q, k, v = attn.heads(x)
    expected = base.head(attn.proj(softmax_over_prefix(q, k, v, adapter.prefix_keys, adapter.prefix_values, bias)
                                   .transpose(1, 2).flatten(2)))
    torch.testing.assert_close(model(x, **kwargs), expected, **TOL)
    assert not torch.allclose(model(x, **kwargs), base(x, **kwargs))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A module-level helper that calls SDPA (a common way to write attention)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class HelperAttention(MyAttention):
    """Calls SDPA through a module-level helper function."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.proj(_attend(*self.heads(x), mask).transpose(1, 2).flatten(2))


class AliasedAttention(MyAttention):
    """Calls SDPA under another name (``from torch.nn.functional import scaled_dot_product_attention as ...``)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.proj(fused_attention(*self.heads(x), attn_mask=mask).transpose(1, 2).flatten(2))


class HeldAttention(MyAttention):
    """Holds SDPA as an attribute set in ``__init__`` (a switch between kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.attend = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.proj(self.attend(*self.heads(x), attn_mask=mask).transpose(1, 2).flatten(2))


class StaticHelperAttention(MyAttention):
    """Calls SDPA two calls below its forward: a staticmethod that calls a module-level helper."""

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _attend(q, k, v, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.proj(self.attend(*self.heads(x), mask).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("kind", ["none", "additive_padding"])
@pytest.mark.parametrize("attention", [HelperAttention, AliasedAttention, HeldAttention, StaticHelperAttention])
def test_sdpa_reached_through_a_helper_an_alias_or_an_attribute_is_found_and_exact(attention: type[MyAttention], kind: str) -> None:
    torch.manual_seed(0)
    base = Net(attention()).double()
    model, adapter = adapted(base)
    kwargs, bias = masks(kind)
    x = torch.randn(B, N, 8, dtype=torch.float64)
    q, k, v = adapter.base_layer.heads(x)
    out = softmax_over_prefix(q, k, v, adapter.prefix_keys, adapter.prefix_values, bias)
    torch.testing.assert_close(model(x, **kwargs), base.head(adapter.base_layer.proj(out.transpose(1, 2).flatten(2))),
                               **TOL)


class TorchMHAForward(nn.Module):
    """Calls torch's multi_head_attention_forward (imported by name): it reaches SDPA only inside torch's own
    dispatch, where the seam cannot enter, so the SDPA handler must not take it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.embed_dim = 2, 8
        self.in_proj, self.out_proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multi_head_attention_forward(x, x, x, 8, 2, self.in_proj.weight, self.in_proj.bias, None, None, False,
                                            0.0, self.out_proj.weight, self.out_proj.bias, need_weights=False)[0]


def test_torchs_own_functions_are_not_followed_to_sdpa() -> None:
    assert sdpa_shape(TorchMHAForward()) is None
    assert sdpa_shape(HelperAttention()) is not None  # the same search follows a user's helper


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_grouped_query_attention_gets_one_prefix_per_key_value_head(enable_gqa: bool) -> None:
    torch.manual_seed(0)
    base = Net(GQAttention(enable_gqa), dim=16).double()
    model, adapter = adapted(base)
    assert adapter.prefix_keys.shape == (2, P, 4)
    x = torch.randn(B, N, 16, dtype=torch.float64)
    attn = adapter.base_layer
    q = attn.q_proj(x).view(B, N, 4, 4).transpose(1, 2)
    k, v = (proj(x).view(B, N, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1) for proj in (attn.k_proj, attn.v_proj))
    pk, pv = (t.repeat_interleave(2, dim=0) for t in (adapter.prefix_keys, adapter.prefix_values))  # head j: kv j // 2
    causal = torch.zeros(N, N, dtype=torch.float64).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    expected = base.head(attn.o_proj(softmax_over_prefix(q, k, v, pk, pv, causal).transpose(1, 2).flatten(2)))
    torch.testing.assert_close(model(x), expected, **TOL)


class LastQueries(MyAttention):
    """Causal attention of the last two positions over all six keys (L != S)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = self.heads(x)
        return F.scaled_dot_product_attention(q[:, :, -2:], k, v, is_causal=True).sum()


def test_is_causal_with_fewer_queries_than_keys_keeps_sdpas_mask_over_the_real_keys() -> None:
    # SDPA's is_causal is top-left aligned (query i sees keys j <= i); the prefix must not shift that
    torch.manual_seed(0)
    base = nn.ModuleDict({"attn": LastQueries()}).double()
    model = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=P))
    adapter = model["attn"]
    x = torch.randn(B, N, 8, dtype=torch.float64)
    q, k, v = adapter.base_layer.heads(x)
    top_left = torch.zeros(2, N, dtype=torch.float64).masked_fill(~torch.ones(2, N, dtype=torch.bool).tril(), -math.inf)
    expected = softmax_over_prefix(q[:, :, -2:], k, v, adapter.prefix_keys, adapter.prefix_values, top_left).sum()
    torch.testing.assert_close(adapter(x), expected, **TOL)


class FoldedHeads(MyAttention):
    """Heads folded into the batch, ``(b·h, n, d)`` with a per-head bias, as timm's SAM attention."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = (t.flatten(0, 1) for t in self.heads(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.flatten(0, 1) if mask is not None else None)
        return self.proj(out.unflatten(0, (x.shape[0], -1)).transpose(1, 2).flatten(2))


def test_heads_folded_into_the_batch_get_one_prefix_per_head() -> None:
    torch.manual_seed(0)
    base = Net(FoldedHeads()).double()
    model, adapter = adapted(base)
    kwargs, bias = masks("additive_per_head")
    x = torch.randn(B, N, 8, dtype=torch.float64)
    attn = adapter.base_layer
    q, k, v = attn.heads(x)
    out = softmax_over_prefix(q, k, v, adapter.prefix_keys, adapter.prefix_values, bias)
    torch.testing.assert_close(model(x, **kwargs), base.head(attn.proj(out.transpose(1, 2).flatten(2))), **TOL)
    gated, _ = adapted(base, gate=True)
    assert torch.equal(gated(x, **kwargs), base(x, **kwargs))  # the gate's exact start holds on folded heads too


class TwoCalls(MyAttention):
    """Attention plus a second SDPA call of another width (a pooling over 3-wide features): not the layer's."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        pooled = F.scaled_dot_product_attention(x[:, None, :1, :3], x[:, None, :, :3], x[:, None, :, :3])
        return super().forward(x) + pooled.sum()


def test_an_sdpa_call_of_another_shape_in_the_same_forward_passes_through_unchanged() -> None:
    torch.manual_seed(0)
    base = Net(TwoCalls()).double()
    model, adapter = adapted(base)
    x = torch.randn(B, N, 8, dtype=torch.float64)
    attn = adapter.base_layer
    q, k, v = attn.heads(x)
    pooled = (x[:, None, :1, :3] @ x[:, None, :, :3].transpose(-1, -2) / math.sqrt(3)).softmax(-1) @ x[:, None, :, :3]
    out = softmax_over_prefix(q, k, v, adapter.prefix_keys, adapter.prefix_values, None)
    torch.testing.assert_close(model(x), base.head(attn.proj(out.transpose(1, 2).flatten(2)) + pooled.sum()), **TOL)


def test_only_the_prefix_trains_and_a_few_sgd_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model, adapter = adapted(Net())
    x, target = torch.randn(8, N, 8), torch.randn(8, N, 3)
    model(x, causal=True).sum().backward()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"attn.prefix_keys", "attn.prefix_values"}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"attn.prefix_keys", "attn.prefix_values"}
    assert adapter.prefix_keys.grad.abs().sum() > 0 and adapter.prefix_values.grad.abs().sum() > 0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x, causal=True), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_disabled_adapters_give_the_base_outputs_and_a_saved_adapter_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Net()
    model, _ = adapted(base)
    x = torch.randn(B, N, 8)
    with adapters_disabled(model):
        assert torch.equal(model(x, causal=True), base(x, causal=True))
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert isinstance(loaded.attn, SdpaPrefixAttention)
    assert torch.equal(loaded(x, causal=True), model(x, causal=True))


def test_the_gate_starts_exactly_at_the_base_and_opens_to_a_prefix_branch_of_its_own() -> None:
    torch.manual_seed(0)
    base = Net().double()
    model, adapter = adapted(base, gate=True)
    x = torch.randn(B, N, 8, dtype=torch.float64)
    out = model(x, causal=True)
    assert torch.equal(out, base(x, causal=True))
    out.pow(2).sum().backward()
    assert adapter.prefix_gate.grad.abs().sum() > 0
    with torch.no_grad():
        adapter.prefix_gate.fill_(0.7)
    attn = adapter.base_layer
    q, k, v = attn.heads(x)
    _, causal = masks("causal")
    own = softmax_over_prefix(q, k[..., :0, :], v[..., :0, :], adapter.prefix_keys, adapter.prefix_values, None)
    mixed = softmax_over_prefix(q, k, v, k[..., :0, :], v[..., :0, :], causal) + math.tanh(0.7) * own
    torch.testing.assert_close(model(x, causal=True), base.head(attn.proj(mixed.transpose(1, 2).flatten(2))), **TOL)


class HandAttention(nn.Module):
    """Scores computed by hand: no SDPA call to intercept."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.qkv = 2, 4, nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return ((q @ k.transpose(-1, -2) * 0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)


class NoHeadsAttention(nn.Module):
    """Calls SDPA, but its head count and width are kept under names we do not read."""

    def __init__(self) -> None:
        super().__init__()
        self.h, self.qkv = 2, nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, self.h, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_attention_computed_by_hand_is_still_refused() -> None:
    refusal = r"no handler for the attention layers of Sequential: .*HandAttention .*register_attention_handler"
    with pytest.raises(TargetNotFoundError, match=refusal) as info:
        inject(nn.Sequential(HandAttention()), PrefixTuningConfig(num_tokens=P))
    assert "scaled_dot_product_attention" not in str(info.value)


def test_sdpa_attention_without_readable_head_attributes_is_refused_naming_them() -> None:
    refusal = (r"no handler for the attention layers of Sequential: .*NoHeadsAttention .*NoHeadsAttention call\(s\) "
               r"F\.scaled_dot_product_attention.*set the attributes num_heads .*head_dim .*num_kv_heads")
    with pytest.raises(ValueError, match=refusal):  # TargetNotFoundError subclasses ValueError
        inject(nn.Sequential(NoHeadsAttention()), PrefixTuningConfig(num_tokens=P))


class SwitchedAttention(MyAttention):
    """timm's convention: SDPA only when ``fused_attn``, scores by hand otherwise."""

    fused_attn = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = self.heads(x)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-1, -2) / 2).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).flatten(2))


def test_sdpa_attention_on_its_explicit_path_is_refused_naming_fused_attn() -> None:
    refusal = (r"no handler for the attention layers of Net: .*SwitchedAttention .*SwitchedAttention call\(s\) "
               r"F\.scaled_dot_product_attention only when fused_attn is True \(it is False\)")
    with pytest.raises(TargetNotFoundError, match=refusal):
        inject(Net(SwitchedAttention()), PrefixTuningConfig(num_tokens=P))
    switched = SwitchedAttention()
    switched.fused_attn = True
    assert isinstance(inject(Net(switched), PrefixTuningConfig(num_tokens=P)).attn, SdpaPrefixAttention)


class WrongWidth(MyAttention):
    """Declares a head width its keys do not have."""

    head_dim = 2


def test_head_attributes_that_do_not_describe_the_keys_raise_at_the_first_forward() -> None:
    model, _ = adapted(Net(WrongWidth()))
    refusal = (r"WrongWidth called F\.scaled_dot_product_attention with queries \(2, 2, 6, 4\) and keys "
               r"\(2, 2, 6, 4\), but its prefix was built for 2 query heads, 2 key/value heads of width 2 .*"
               r"Set num_heads, num_kv_heads and head_dim")
    with pytest.raises(ValueError, match=refusal):
        model(torch.randn(B, N, 8))


def test_a_forward_that_stops_calling_sdpa_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model, adapter = adapted(Net())
    attn = adapter.base_layer

    def by_hand(x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        q, k, v = attn.heads(x)
        return attn.proj(((q @ k.transpose(-1, -2) / 2).softmax(-1) @ v).transpose(1, 2).flatten(2))

    monkeypatch.setattr(attn, "forward", by_hand)
    with pytest.raises(ParticipationError, match=r"MyAttention ran without calling F.scaled_dot_product_attention"):
        model(torch.randn(B, N, 8))


class ConfiguredAttention(MyAttention):
    """As transformers' attention before its registry (Falcon before 5.25): SDPA for "sdpa" (here through
    ``super().forward``, which detection follows), scores by hand for "eager"."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(_attn_implementation="sdpa")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if self.config._attn_implementation == "sdpa":
            return super().forward(x, mask, causal)
        q, k, v = self.heads(x)
        return self.proj(((q @ k.transpose(-1, -2) / 2).softmax(-1) @ v).transpose(1, 2).flatten(2))


def test_a_model_configured_for_eager_attention_raises_naming_sdpa() -> None:
    model, adapter = adapted(Net(ConfiguredAttention()))
    model(torch.randn(B, N, 8))  # "sdpa": the prefix enters
    adapter.base_layer.config._attn_implementation = "eager"
    with pytest.raises(ParticipationError, match=r"ConfiguredAttention ran without calling "
                                                 r"F\.scaled_dot_product_attention.*attn_implementation='sdpa'"):
        model(torch.randn(B, N, 8))


def test_known_families_keep_their_handlers_and_sdpa_is_asked_last() -> None:
    assert _HANDLERS[-1](MyAttention()) is not None
    assert match_attention(nn.MultiheadAttention(8, 2)).adapter is MultiheadPrefixAttention  # type: ignore[union-attr]
    timm_attention = pytest.importorskip("timm.layers.attention")
    match = match_attention(timm_attention.Attention(16, num_heads=2))
    assert match is not None and match.adapter is SdpaPrefixAttention  # timm's Attention calls SDPA: no table


def test_compiles_without_graph_breaks_and_matches_eager() -> None:
    torch.manual_seed(0)
    model, adapter = adapted(Net())
    x = torch.randn(B, N, 8)
    explained = torch._dynamo.explain(model)(x, causal=True)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x, causal=True)
    torch.testing.assert_close(out, model(x, causal=True), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert adapter.prefix_keys.grad is not None and [n for n, _ in adapters(model)] == ["attn"]


class WindowedAttention(nn.Module):
    """A user's windowed attention: SDPA on ``(b, heads, windows, tokens, d)`` (heads before windows, as Hiera)."""

    def __init__(self, windows: int, dim: int = 8, num_heads: int = 2) -> None:
        super().__init__()
        self.windows, self.num_heads, self.dim = windows, num_heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape  # tokens in window-major order -> 3 x (b, h, windows, n / windows, d)
        fused = self.qkv(x).view(b, self.windows, n // self.windows, 3, self.num_heads, -1)
        return tuple(fused.permute(3, 0, 4, 1, 2, 5).unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, h, w, t, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).flatten(3).flatten(1, 2))


def test_heads_before_windows_are_found_on_axis_minus_4_and_each_window_sees_the_prefix() -> None:
    torch.manual_seed(0)
    model, adapter = adapted(Net(WindowedAttention(windows=3)).double())
    x = torch.randn(B, N, 8, dtype=torch.float64)
    attn = adapter.base_layer
    q, k, v = attn.heads(x)  # (b, h, w, t, d)
    pk, pv = adapter.prefix_keys[:, None], adapter.prefix_values[:, None]  # (h, 1, p, d): every window
    keys, values = torch.cat([pk.expand(B, -1, 3, -1, -1), k], -2), torch.cat([pv.expand(B, -1, 3, -1, -1), v], -2)
    out = (q @ keys.transpose(-1, -2) / math.sqrt(4)).softmax(-1) @ values
    expected = model.head(attn.proj(out.permute(0, 2, 3, 1, 4).flatten(3).flatten(1, 2)))
    torch.testing.assert_close(model(x), expected, **TOL)


def test_heads_and_windows_of_equal_count_are_refused_unless_a_handler_says_the_layout() -> None:
    model, _ = adapted(Net(WindowedAttention(windows=2)))  # axes -3 and -4 both have 2
    with pytest.raises(ValueError, match="axes -3 and -4 both have its 2 heads.*layout_heads_axis"):
        model(torch.randn(B, 4, 8))


def test_timm_hiera_mask_unit_attention_takes_the_prefix_in_every_mask_unit() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, num_classes=3).eval()
    nn.init.normal_(base.head.fc.weight)  # timm starts the head at 0: every output would equal
    x = torch.randn(2, 3, 64, 64)
    expected = base(x)
    model = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=2))
    found = [m for m in model.modules() if isinstance(m, SdpaPrefixAttention)]
    assert found and all(type(m).__name__ == "HieraPrefixAttention" for m in found)
    out = model(x)
    assert (out - expected).abs().max() > 1e-3
    with adapters_disabled(model):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    gated = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=2, gate=True))
    torch.testing.assert_close(gated(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prefix_first", [True, False])
def test_lora_and_prefix_on_a_users_helper_module_in_either_order_in_train_and_eval(prefix_first: bool) -> None:
    """LoRA on the qkv projection and a prefix at the SDPA call of a module found through its helper: outputs equal
    the written-out softmax over the prefix and the LoRA-adapted keys in train mode and under eval + no_grad, and
    exactly the four adapter tensors get a gradient."""
    torch.manual_seed(0)
    base = Net(HelperAttention()).double()
    methods = [PrefixTuningConfig(num_tokens=P), LoRAConfig(r=2, target_modules=["qkv"])]
    model = inject(copy.deepcopy(base), *(methods if prefix_first else methods[::-1]))
    prefix = next(a for _, a in adapters(model) if isinstance(a, SdpaPrefixAttention))
    lora_b = next(p for n, p in model.named_parameters() if n.endswith("lora_B"))
    with torch.no_grad():
        lora_b.normal_()  # LoRA's B starts at zero: give it a value that changes q, k and v
    x = torch.randn(B, N, 8, dtype=torch.float64)

    def expected() -> torch.Tensor:
        attn = prefix.base_layer
        q, k, v = attn.heads(x)  # through the LoRA-adapted qkv
        out = softmax_over_prefix(q, k, v, prefix.prefix_keys, prefix.prefix_values, None)
        return model.head(attn.proj(out.transpose(1, 2).flatten(2)))

    out = model.train()(x)
    torch.testing.assert_close(out, expected(), **TOL)
    out.square().sum().backward()
    with_grad = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert with_grad == {"prefix_keys", "prefix_values", "lora_A", "lora_B"}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected(), **TOL)
        assert not torch.allclose(model(x), base(x))

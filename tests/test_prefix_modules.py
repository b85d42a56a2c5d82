"""Prefix tuning outside transformers: nn.MultiheadAttention (torchvision ViT, TransformerEncoder), timm
Attention, the handler registry, and the error for models without attention."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_peft import LoRA, PrefixTuning, TargetNotFoundError, adapters, inject, register_attention_handler
from lightning_peft.errors import ParticipationError, PEFTWarning
from lightning_peft.prefix.attention import (
    _HANDLERS,
    AttentionClass,
    AttentionMatch,
    PrefixAttention,
    PrefixShape,
    class_table_handler,
    match_attention,
)
from lightning_peft.prefix.attention.base import prefixed_attention

TOL = dict(atol=1e-5, rtol=1e-4)


def prefix_adapters(model: nn.Module) -> list[PrefixAttention]:
    return [a for _, a in adapters(model) if isinstance(a, PrefixAttention)]


def masks(kind: str, b: int, n: int, heads: int) -> dict[str, torch.Tensor | bool]:
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[0, -2:] = True  # True: ignore (torch's convention)
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "bool_causal": {"attn_mask": causal},
        "float_per_head": {"attn_mask": torch.randn(b * heads, n, n, generator=torch.Generator().manual_seed(2))},
        "is_causal_and_padding": {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["none", "padding", "bool_causal", "float_per_head", "is_causal_and_padding"])
def test_multihead_prefix_of_one_equals_torch_add_bias_kv(batch_first: bool, kind: str) -> None:
    """torch's ``add_bias_kv`` appends one learned key/value after projection: a one-token prefix."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=batch_first).eval()
    plain = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    plain.load_state_dict({k: v for k, v in reference.state_dict().items() if k not in ("bias_k", "bias_v")})
    holder = inject(nn.Sequential(plain), PrefixTuning(num_tokens=1))
    adapter = prefix_adapters(holder)[0]
    with torch.no_grad():
        adapter.prefix_keys.copy_(reference.bias_k.reshape(2, 1, 4))
        adapter.prefix_values.copy_(reference.bias_v.reshape(2, 1, 4))
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    kwargs = masks(kind, 3, 5, 2)
    got, got_weights = holder[0](x, x, x, **kwargs)
    expected, expected_weights = reference(x, x, x, **kwargs)
    torch.testing.assert_close(got, expected, **TOL)
    assert got_weights.shape == (3, 5, 1 + 5)  # n x (p + n), prefix first (torch puts bias_kv last)
    torch.testing.assert_close(got_weights.roll(-1, dims=-1), expected_weights, **TOL)


def test_multihead_matches_written_out_attention_with_longer_prefix() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    model = inject(nn.Sequential(mha), PrefixTuning(num_tokens=3))
    adapter = prefix_adapters(model)[0]
    x = torch.randn(2, 4, 8)
    padding = torch.tensor([[False, False, True, True], [False] * 4])
    got, _ = model[0](x, x, x, key_padding_mask=padding, need_weights=False)
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    heads = lambda t: t.view(2, -1, 2, 4).transpose(1, 2)  # noqa: E731
    k = torch.cat([adapter.prefix_keys.expand(2, -1, -1, -1), heads(x @ wk.T + bk)], dim=2)
    v = torch.cat([adapter.prefix_values.expand(2, -1, -1, -1), heads(x @ wv.T + bv)], dim=2)
    scores = heads(x @ wq.T + bq) @ k.transpose(-1, -2) / 2.0  # sqrt(head_dim = 4)
    scores = scores.masked_fill(torch.cat([torch.zeros(2, 3, dtype=torch.bool), padding], 1)[:, None, None], -1e9)
    expected = mha.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 4, 8))
    torch.testing.assert_close(got, expected, **TOL)


def test_transformer_encoder_in_eval_with_padding_uses_the_prefix() -> None:
    """The fused fast path and nested tensors would skip the adapter: they must be off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2).eval()
    base = copy.deepcopy(encoder)
    model = inject(encoder, PrefixTuning(num_tokens=2))
    x, padding = torch.randn(2, 5, 8), torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    with torch.no_grad():
        out, base_out = model(x, src_key_padding_mask=padding), base(x, src_key_padding_mask=padding)
        slow_path = model.train()(x, src_key_padding_mask=padding)  # training mode never takes the fused paths
    assert len(prefix_adapters(model)) == 2
    assert (out - base_out)[~padding].abs().max() > 1e-3
    torch.testing.assert_close(out[~padding], slow_path[~padding], **TOL)


def test_torchvision_vit_gets_prefixes_and_trains_them() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=3)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: no gradient would flow
    model = inject(model, PrefixTuning(num_tokens=4, trainable_modules=["heads"]))
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert len(prefix_adapters(model)) == 2
    assert all(a.prefix_keys.grad.abs().sum() > 0 for a in prefix_adapters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        *(f"encoder.layers.encoder_layer_{i}.self_attention.prefix_{t}" for i in range(2) for t in ("keys", "values")),
        "heads.head.weight", "heads.head.bias"}


def tiny_timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             embed_dim=16, num_heads=2, num_classes=3).eval()


def test_timm_attention_equals_written_out_prefix_attention() -> None:
    model = inject(tiny_timm_vit(), PrefixTuning(num_tokens=3))
    adapter = prefix_adapters(model)[0]
    attn = adapter.base_layer
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    k = torch.cat([adapter.prefix_keys.expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([adapter.prefix_values.expand(2, -1, -1, -1), v], dim=2)
    weights = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)
    assert weights.shape == (2, 2, 5, 3 + 5)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(adapter(x), expected, **TOL)
    attn.fused_attn = False  # timm's explicit path computes scores without SDPA, where the prefix enters
    with pytest.raises(ParticipationError, match="set fused_attn = True"):
        adapter(x)


@pytest.mark.parametrize("make", ["timm", "mha"])
def test_exact_start_gate_equals_base_outside_transformers(make: str) -> None:
    torch.manual_seed(0)
    if make == "timm":
        base, x = tiny_timm_vit(), torch.randn(2, 3, 16, 16)
    else:
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        base, x = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), torch.randn(2, 5, 8)
    model = inject(copy.deepcopy(base), PrefixTuning(num_tokens=3, gate=True))
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, base(x), atol=1e-6, rtol=1e-6)
    out.pow(2).sum().backward()
    assert all(a.prefix_gate.grad.abs() > 0 for a in prefix_adapters(model))


def test_resnet_without_attention_gets_an_error_suggesting_lora_or_pixel_prompts() -> None:
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(TargetNotFoundError, match=r"no attention layer in ResNet.*LoRA.*pixel prompts"):
        inject(torchvision.models.resnet18(num_classes=2), PrefixTuning(num_tokens=4))


def test_layers_and_target_modules_select_attention_layers() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 3,
                                    enable_nested_tensor=False)
    model = inject(encoder, PrefixTuning(num_tokens=2, layers=[0, 2]))
    assert [n for n, _ in adapters(model)] == ["layers.0.self_attn", "layers.2.self_attn"]
    with pytest.raises(TargetNotFoundError, match=r"found attention modules .*layers\.0\.self_attn.*none is left after layers=\[7\]"):
        inject(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False),
               PrefixTuning(num_tokens=2, layers=[7]))


class OwnAttention(nn.Module):
    """A user's attention class that no built-in handler knows."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape
        return tuple(t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        out = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v  # scores by hand: no SDPA call
        return self.out(out.transpose(1, 2).reshape(x.shape))


class OwnPrefixAttention(PrefixAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.base_layer.split(x)
        out, _ = prefixed_attention(self, q, k, v, None)
        return self.base_layer.out(out.transpose(1, 2).reshape(x.shape))


def test_registered_handler_teaches_prefix_tuning_a_new_attention_class() -> None:
    model = nn.Sequential(OwnAttention(), nn.ReLU())
    refusal = r"no handler for the attention layers of Sequential: .*OwnAttention .*register_attention_handler"
    with pytest.raises(TargetNotFoundError, match=refusal):
        inject(copy.deepcopy(model), PrefixTuning(num_tokens=2))

    @register_attention_handler
    def own(module: nn.Module) -> AttentionMatch | None:
        return AttentionMatch(OwnPrefixAttention, PrefixShape(2, 4, 4)) if isinstance(module, OwnAttention) else None

    try:
        x = torch.randn(2, 3, 8)
        base = model(x)
        adapted = inject(model, PrefixTuning(num_tokens=2))
        assert isinstance(adapted[0], OwnPrefixAttention) and adapted(x).shape == (2, 3, 8)
        assert not torch.allclose(adapted(x), base)
    finally:
        _HANDLERS.remove(own)


class OwnAttentionSubclass(OwnAttention):
    pass


@pytest.mark.parametrize("subclasses", [False, True])
def test_class_table_handler_matches_the_named_class_exactly_or_with_its_subclasses(subclasses: bool) -> None:
    shape = PrefixShape(2, 4, 4)  # read from its attributes: heads = 2, a fused qkv of 3 x 2 x 4 outputs
    own = class_table_handler((AttentionClass(__name__, "OwnAttention", OwnPrefixAttention, subclasses=subclasses),))
    assert own(OwnAttention()) == AttentionMatch(OwnPrefixAttention, shape)
    assert (own(OwnAttentionSubclass()) is not None) == subclasses
    assert own(nn.Linear(8, 8)) is None
    missing = class_table_handler((AttentionClass("not_imported.module", "OwnAttention", OwnPrefixAttention),))
    assert missing(OwnAttention()) is None  # a module that is not imported holds no class to match
    register_attention_handler(own)
    try:
        assert match_attention(OwnAttention()) == AttentionMatch(OwnPrefixAttention, shape)
        x = torch.randn(2, 3, 8)
        assert inject(nn.Sequential(OwnAttention()), PrefixTuning(num_tokens=2))(x).shape == (2, 3, 8)
    finally:
        _HANDLERS.remove(own)


def test_a_second_prefix_on_prefixed_attention_is_refused_and_lora_still_composes() -> None:
    layer = inject(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), PrefixTuning(num_tokens=2))
    with pytest.raises(ValueError, match="already (has a prefix|holds prefix tuning adapters).*unload"):
        inject(layer, PrefixTuning(num_tokens=2))
    assert sum("prefix_keys" in n for n, _ in layer.named_parameters()) == 1
    both = inject(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), LoRA(r=2, target_modules=["self_attn"]))
    inject(both, PrefixTuning(num_tokens=2))  # attention inside a LoRA adapter still gets its prefix
    assert {"self_attn.base_layer.prefix_keys", "self_attn.lora_A"} <= {n for n, _ in both.named_parameters()}


def test_open_gate_adds_the_prefix_attention_of_its_own_softmax_scaled_by_tanh() -> None:
    # the gate at 0 only shows the base; at 0.7 the prefix branch must be attn(q, pk, pv) · tanh(0.7), written out
    torch.manual_seed(0)
    holder = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True)})
    inject(holder, PrefixTuning(num_tokens=3, gate=True))
    adapter, mha = holder["attn"], holder["attn"].base_layer
    with torch.no_grad():
        adapter.prefix_gate.fill_(0.7)
    x = torch.randn(2, 5, 8)
    heads = lambda t: t.view(2, -1, 2, 4).transpose(1, 2)  # noqa: E731  (b, L, E) -> (b, h, L, d)
    q, k, v = (heads(t) for t in torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    pk, pv = (t.unsqueeze(0).expand(2, -1, -1, -1) for t in (adapter.prefix_keys, adapter.prefix_values))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mixed = sdpa(q, k, v) + torch.tanh(torch.tensor(0.7)) * sdpa(q, pk, pv)
    expected = mha.out_proj(mixed.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(adapter(x, x, x, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)


def test_a_model_with_known_and_unknown_attention_warns_which_layers_keep_no_prefix() -> None:
    model = nn.ModuleDict({"known": nn.MultiheadAttention(8, 2, batch_first=True), "own": OwnAttention()})
    with pytest.warns(PEFTWarning, match=r"adapts 1 attention layers of ModuleDict but not 1 others .*OwnAttention "
                                         r"\(e\.g\. 'own'\)"):
        adapted = inject(model, PrefixTuning(num_tokens=2))
    assert [n for n, _ in adapters(adapted)] == ["known"]


class TokenMixer(OwnAttention):
    """Attention under a name that does not say so."""


class AttentionBlock(nn.Module):
    """A block whose name says attention, around a handled mixer and a non-attention layer."""

    def __init__(self) -> None:
        super().__init__()
        self.mixer, self.norm = TokenMixer(), nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.norm(x))


def test_a_block_named_attention_around_a_handled_layer_is_not_reported_as_unhandled() -> None:
    mixer = class_table_handler((AttentionClass(__name__, "TokenMixer", OwnPrefixAttention,
                                                lambda m: PrefixShape(2, 4, 4)),))
    register_attention_handler(mixer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PEFTWarning)  # the block holds the handled layer: nothing left out
            adapted = inject(nn.Sequential(AttentionBlock()), PrefixTuning(num_tokens=2))
        assert [n for n, _ in adapters(adapted)] == ["0.mixer"]
        with pytest.warns(PEFTWarning, match=r"but not 1 others .*OwnAttention \(e\.g\. '1'\)"):
            inject(nn.Sequential(AttentionBlock(), OwnAttention()), PrefixTuning(num_tokens=2))
    finally:
        _HANDLERS.remove(mixer)

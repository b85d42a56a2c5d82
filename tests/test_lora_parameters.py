"""LoRA on parameters a module reads itself (target_parameters): the 3-D expert weights of transformers 5 MoE models.

Checked against the formula written out (W[e] + s·B[e]A[e] put into a copy of the base model) and against HF PEFT's
``target_parameters`` on the same weights."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import transformers
from torch import nn

from zoo_checks import check_cell, seeded

from lightning_peft import LoRAConfig, TargetNotFoundError, adapters, inject, load_adapter, merge, save_adapter, unmerge
from lightning_peft.lora import LoRAParameters

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
TOL = dict(atol=1e-5, rtol=1e-4)


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def randomize(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            factors = adapter.lora_B.values() if isinstance(adapter, LoRAParameters) else [adapter.lora_B]
            for b in factors:
                b.copy_(torch.randn(b.shape, generator=generator) * 0.3)


def by_hand(base: nn.Module, adapted: nn.Module, scale: float) -> nn.Module:
    """A copy of ``base`` whose expert weights are W[e] + scale · B[e] @ A[e], computed here."""
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for name, adapter in adapters(adapted):
            experts = expected.get_submodule(name)
            for param, a in adapter.lora_A.items():
                b = adapter.lora_B[param]
                delta = torch.einsum("eor,eri->eoi", b, a) * scale
                getattr(experts, param).add_(delta.transpose(1, 2) if adapter.transposed else delta)
    return expected


def test_expert_updates_start_at_identity_and_equal_the_formula_once_trained() -> None:
    base = mixtral()
    model = inject(copy.deepcopy(base), LoRAConfig(r=2, alpha=4.0, target_modules=[], target_parameters=PARAMS))
    assert [n for n, _ in adapters(model)] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        f"model.layers.{i}.mlp.experts.lora_{ab}.{p.split('.')[1]}" for i in range(2) for ab in "AB" for p in PARAMS)
    adapter = model.get_submodule("model.layers.0.mlp.experts")
    assert dict((k, tuple(v.shape)) for k, v in adapter.lora_A.items()) == {"gate_up_proj": (4, 2, 32),
                                                                           "down_proj": (4, 2, 16)}
    assert dict((k, tuple(v.shape)) for k, v in adapter.lora_B.items()) == {"gate_up_proj": (4, 32, 2),
                                                                           "down_proj": (4, 32, 2)}
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, base(ids()).logits)
    randomize(model)
    with torch.no_grad():
        got, plain = model(ids()).logits, base(ids()).logits
        torch.testing.assert_close(got, by_hand(base, model, scale=2.0)(ids()).logits, **TOL)
    assert (got - plain).abs().max() > 1e-2


def test_gradients_reach_every_expert_factor_and_nothing_else() -> None:
    model = inject(mixtral(), LoRAConfig(r=2, target_modules=[], target_parameters=PARAMS))
    randomize(model)
    tokens = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(3))
    model(tokens, labels=tokens).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for name, grad in grads.items():  # every expert was routed some tokens: each one's A and B learn
        assert (grad.flatten(1).abs().sum(1) > 0).all(), name


def test_merge_is_exact_and_save_load_is_bitwise(tmp_path: Path) -> None:
    base = mixtral()
    model = inject(copy.deepcopy(base), LoRAConfig(r=2, target_parameters=["experts.gate_up_proj"],
                                                   target_modules=["q_proj"]))
    randomize(model)
    save_adapter(model, tmp_path)
    fresh = load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        unmerged = model(ids()).logits
        assert torch.equal(fresh(ids()).logits, unmerged)
        torch.testing.assert_close(merge(model)(ids()).logits, unmerged, **TOL)
        unmerge(model)
        weight = model.get_submodule("model.layers.0.mlp.experts").base_layer.gate_up_proj
        torch.testing.assert_close(weight, base.get_submodule("model.layers.0.mlp.experts").gate_up_proj,
                                   atol=1e-6, rtol=0)


def test_equals_hf_peft_target_parameters_on_the_same_weights() -> None:
    base = mixtral()
    ours = inject(copy.deepcopy(base), LoRAConfig(r=2, alpha=6.0, target_modules=[], target_parameters=PARAMS))
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, target_modules=[],
                                                                     target_parameters=PARAMS)).eval()
    with torch.no_grad():
        for name, adapter in adapters(ours):
            for param, a in adapter.lora_A.items():
                wrapper = _peft_wrapper(theirs, name, param)
                experts, out, r = adapter.lora_B[param].shape
                wrapper.lora_A["default"].weight.copy_(a.reshape(experts * r, -1))  # (experts·r, in), expert-major
                wrapper.lora_B["default"].weight.copy_(  # (out, r·experts), expert-minor
                    adapter.lora_B[param].permute(1, 2, 0).reshape(out, r * experts))
        torch.testing.assert_close(theirs(ids()).logits, ours(ids()).logits, **TOL)


def _peft_wrapper(model: nn.Module, name: str, param: str) -> nn.Module:
    module = model.base_model.model.get_submodule(name)
    while getattr(module, "parameter_name", param) != param:
        module = module.base_layer
    return module


class TransposedExperts(nn.Module):
    """Experts stored ``(experts, in, out)``, as transformers marks with ``is_transposed`` (GPT-OSS)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # every expert on every token, summed
        return torch.einsum("ni,eio->no", x, self.up)


def test_transposed_experts_and_a_2d_parameter_follow_their_layout() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(TransposedExperts(), nn.Linear(5, 4))
    model = inject(copy.deepcopy(base), LoRAConfig(r=2, target_modules=[], target_parameters=["0.up", "1.weight"]))
    assert isinstance(model[0], LoRAParameters) and model[0].lora_A["up"].shape == (3, 2, 8)
    assert model[1].lora_A["weight"].shape == (1, 2, 5)
    randomize(model)
    x = torch.randn(6, 8)
    with torch.no_grad():
        delta = torch.bmm(model[0].lora_B["up"], model[0].lora_A["up"]) * model[0].scale  # (e, out, in)
        lin = base[1].weight + (model[1].lora_B["weight"] @ model[1].lora_A["weight"])[0] * model[1].scale
        expected = torch.einsum("ni,eio->no", x, base[0].up + delta.transpose(1, 2)) @ lin.T + base[1].bias
        torch.testing.assert_close(model(x), expected, **TOL)


def test_bad_target_parameters_are_refused_with_the_fix() -> None:
    with pytest.raises(TargetNotFoundError, match=r"target_parameters='experts\.gate_proj' matched no parameter .*"
                                                  r"Closest parameter names: .*experts\.gate_up_proj"):
        inject(mixtral(), LoRAConfig(target_modules=[], target_parameters=["experts.gate_proj"]))
    with pytest.raises(ValueError, match=r"LoRA cannot adapt 'model\.layers\.0\.mlp\.experts': dropout=0\.1 cannot "
                                         r"apply to target_parameters"):
        inject(mixtral(), LoRAConfig(dropout=0.1, target_modules=[], target_parameters=PARAMS))
    with pytest.raises(TargetNotFoundError, match=r"LoRA selected nothing to adapt in MixtralForCausalLM"):
        inject(mixtral(), LoRAConfig(target_modules=[]))
    with pytest.raises(ValueError, match=r"which target_modules also adapts"):
        inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(target_modules=["0"], target_parameters=["0.weight"]))
    with pytest.raises(ValueError, match=r"adapts 2-D and 3-D weights; Linear\.bias has shape \[4\]"):
        inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(target_modules=[], target_parameters=["0.bias"]))


def test_peft_format_round_trips_expert_updates_both_ways(tmp_path: Path) -> None:
    base = mixtral()
    ours = inject(copy.deepcopy(base), LoRAConfig(r=2, alpha=6.0, target_modules=["q_proj"], target_parameters=PARAMS))
    randomize(ours)
    save_adapter(ours, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ours(ids()).logits
        torch.testing.assert_close(theirs(ids()).logits, expected, **TOL)  # PEFT computes what we do
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert [type(a).__name__ for _, a in adapters(back)] == ["LoRALinear", "LoRAParameters"] * 2
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, expected, **TOL)


def test_peft_format_refuses_expert_ranks_peft_cannot_hold(tmp_path: Path) -> None:
    model = inject(mixtral(), LoRAConfig(r=2, target_modules=["q_proj"], target_parameters=PARAMS,
                                         rank_pattern={"experts": 4}))
    with pytest.raises(ValueError, match=r"target_parameters of 'model\.layers\.0\.mlp\.experts' use r=4.*PEFT applies "
                                         r"the file's r=2"):
        save_adapter(model, tmp_path, format="peft")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


#: transformers 5 MoE families and the config fields that size their experts; GPT-OSS stores (experts, in, out).
MOE = {
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "Qwen3Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "Olmoe": dict(num_experts=4, num_experts_per_tok=2, eos_token_id=None),
    "GptOss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2),
}


def moe(family: str) -> nn.Module:
    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **MOE[family])
    return seeded(lambda: getattr(transformers, f"{family}ForCausalLM")(config)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MOE))
def test_moe_zoo_expert_lora_passes_the_zoo_checks_and_equals_hf_peft(family: str, tmp_path: Path) -> None:
    base = moe(family)
    config = LoRAConfig(r=2, alpha=4.0, target_modules=[], target_parameters=PARAMS)
    report = check_cell(base, config, {"input_ids": ids()}, tmp_path / "cell", starts_as_identity=True,
                        mergeable=True)
    assert report.moved > 1e-3 and report.reloaded == 0.0
    ours = inject(copy.deepcopy(base), config)
    randomize(ours)
    save_adapter(ours, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, ours(ids()).logits, **TOL)

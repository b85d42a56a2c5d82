"""LoRA on layers whose parent reads their weight directly (transformers' Mamba mixers): the update applies and trains.

The reference is the base model with the adapted weight replaced by the formula ``W + (alpha / r) · B A``, built by
hand from the adapter's factors; outputs agree to 1e-5 and the factors' gradients equal the chain rule through
``dL/dW`` of that reference (``dL/dB = s · dL/dW Aᵀ``, ``dL/dA = s · Bᵀ dL/dW``) to 1e-5 (fp32).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_peft.errors import PEFTWarning
from lightning_peft.injection import inject
from lightning_peft.lora import LoRAConfig, LoRALayer
from lightning_peft.operations import adapters_disabled, merge

transformers = pytest.importorskip("transformers")
modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")

R, ALPHA = 2, 4.0


SIZES = dict(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
FAMILIES = {
    "mamba": ("MambaConfig", "MambaForCausalLM", {}),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", {}),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(num_heads=4, head_dim=16, n_groups=1, chunk_size=8)),
}


def tiny_mamba(family: str = "mamba") -> nn.Module:
    torch.manual_seed(0)
    config_name, model_name, extra = FAMILIES[family]
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**SIZES, **extra)).train()


def adapted(targets: list[str], family: str = "mamba") -> tuple[nn.Module, nn.Module, dict[str, LoRALayer]]:
    """(base, LoRA model with random B, name -> adapter)."""
    base = tiny_mamba(family)
    model = inject(copy.deepcopy(base), LoRAConfig(r=R, alpha=ALPHA, target_modules=targets))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(3 * torch.randn(layer.lora_B.shape, generator=generator))
    return base, model, layers


def formula_delta(layer: LoRALayer, shape: torch.Size) -> torch.Tensor:
    """``s · B A`` reshaped to the base weight (for a depthwise conv: the shared form, one matrix update)."""
    return (ALPHA / R) * (layer.lora_B.detach().reshape(-1, R) @ layer.lora_A.detach().reshape(R, -1)).reshape(shape)


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("family", "target"), [("mamba", "dt_proj"), ("mamba", "conv1d"), ("mamba", "x_proj"),
                                               ("falcon_mamba", "dt_proj"), ("mamba2", "conv1d")])
def test_lora_on_mamba_layer_matches_formula_weight_in_outputs_and_gradients(family: str, target: str) -> None:
    base, model, layers = adapted([target], family)
    reference = copy.deepcopy(base)
    weights = {}
    for name, layer in layers.items():
        weight = reference.get_submodule(name).weight
        weight.data += formula_delta(layer, weight.shape)
        weight.requires_grad_(True)
        weights[name] = weight
    expected = reference(IDS, use_cache=False).logits
    got = model(IDS, use_cache=False).logits
    assert (got - base(IDS, use_cache=False).logits).abs().max() > 1e-3  # the update shows (100x the tolerance)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.square().mean().backward()
    got.square().mean().backward()
    for name, layer in layers.items():
        grad_w = weights[name].grad.reshape(weights[name].shape[0], -1)  # (out, in·prod(k))
        a, b = layer.lora_A.detach().reshape(R, -1), layer.lora_B.detach().reshape(-1, R)
        torch.testing.assert_close(layer.lora_B.grad.reshape(-1, R), (ALPHA / R) * grad_w @ a.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_A.grad.reshape(R, -1), (ALPHA / R) * b.T @ grad_w, atol=1e-5, rtol=1e-5)


def test_mamba_kernel_path_receives_folded_weights_with_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # the mamba_ssm kernel (training, no cache) takes conv1d/x_proj/dt_proj/out_proj weights as tensors: record them
    # and fall back to the torch path (None), as the reference function does
    seen: list[dict[str, Any]] = []

    def record(xz: torch.Tensor, conv1d_weight: torch.Tensor, conv1d_bias: Any, x_proj_weight: torch.Tensor,
               delta_proj_weight: torch.Tensor, out_proj_weight: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        seen.append({"conv1d": conv1d_weight, "x_proj": x_proj_weight, "dt_proj": delta_proj_weight,
                     "out_proj": out_proj_weight})

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", record)
    base, model, layers = adapted(["conv1d", "x_proj", "dt_proj", "out_proj"])
    model(IDS, use_cache=False)
    assert len(seen) == 2  # one call per mixer
    for index, passed in enumerate(seen):
        for child, tensor in passed.items():
            name = f"backbone.layers.{index}.mixer.{child}"
            weight = base.get_submodule(name).weight
            torch.testing.assert_close(tensor, weight + formula_delta(layers[name], weight.shape), atol=1e-6, rtol=0)
            assert tensor.requires_grad  # through lora_A and lora_B


def test_directly_read_weight_is_the_base_weight_when_disabled_or_merged() -> None:
    _, model, layers = adapted(["dt_proj"])
    layer = next(iter(layers.values()))
    with adapters_disabled(model):
        assert layer.weight is layer.base_layer.weight
    merge(model)
    assert layer.weight is layer.base_layer.weight


def test_lora_not_read_directly_answers_weight_with_the_base_parameter() -> None:
    _, _, layers = adapted(["in_proj"])
    assert all(layer.weight is layer.base_layer.weight and not layer.read_directly for layer in layers.values())


def test_dropout_on_a_directly_read_layer_warns_that_it_does_not_apply() -> None:
    with pytest.warns(PEFTWarning, match=r"LoRA dropout does not apply where the parent reads this Linear's weight"):
        inject(tiny_mamba(), LoRAConfig(r=R, dropout=0.1, target_modules=["dt_proj"]))


def test_lora_on_wavlm_attention_projections_applies_although_torch_reads_their_weights() -> None:
    # WavLMAttention passes q/k/v/out_proj weights to F.multi_head_attention_forward: without the reader the
    # participation check raises (the adapters are not called, their .weight is read); with it the update applies
    config = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_buckets=16,
                                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    base = transformers.WavLMModel(config).eval()
    model = inject(copy.deepcopy(base), LoRAConfig(r=R, alpha=ALPHA, target_modules=["q_proj", "v_proj", "out_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(audio).last_hidden_state
        assert (adapted - base(audio).last_hidden_state).abs().max() > 1e-3
        torch.testing.assert_close(merge(model)(audio).last_hidden_state, adapted, atol=1e-5, rtol=1e-5)

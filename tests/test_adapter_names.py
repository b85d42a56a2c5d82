"""Adapter tensors found by name (``adapter_name_test``): the same set as ``adapter_tensors`` on every structure,
compiled submodules in checkpoints, and the distributed-checkpoint planner that refuses missing adapter tensors."""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from strategy_models import tiny_gpt2
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from lightning_peft import AdapterStateError, LoRA, PrefixTuning, PromptTuning, add_adapter, inject, set_adapter
from lightning_peft.adapter import Adapter
from lightning_peft.glue.checkpoints import keep_adapter_tensors
from lightning_peft.glue.strategies import _partial_sharded_load
from lightning_peft.state import check_adapter_state
from lightning_peft.tensors import adapter_name_test, adapter_tensors, clean_name, marked


class Holder(nn.Module):
    """A LightningModule's shape: the model is an attribute."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def _named(model: nn.Module) -> nn.Module:
    second = LoRA(r=1, target_modules=["c_proj"], trainable_modules=["ln_f"])
    add_adapter(model, "b", PrefixTuning(num_tokens=2), second)
    return model


def _checkpointed(model: nn.Module) -> nn.Module:
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, GPT2Block))
    return model


def _bn(**kwargs: object) -> nn.Module:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    return inject(cnn, LoRA(r=2, target_modules=["0", "3"], **kwargs))  # type: ignore[arg-type]


STRUCTURES: dict[str, Callable[[], nn.Module]] = {
    "lora": lambda: inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn", "c_proj"])),
    "lora+trainable_modules": lambda: inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"],
                                                               trainable_modules=["ln_f", "h.0.attn"])),
    "prefix": lambda: inject(tiny_gpt2(), PrefixTuning(num_tokens=3)),
    "prefix-reparameterized": lambda: inject(tiny_gpt2(), PrefixTuning(num_tokens=3, reparameterize=True,
                                                                      hidden_size=8)),
    "prefix-gated": lambda: inject(tiny_gpt2(), PrefixTuning(num_tokens=3, gate=True)),
    "prompt": lambda: inject(tiny_gpt2(), PromptTuning(num_tokens=3, init="random")),
    "prompt-over-lora-embedding": lambda: inject(tiny_gpt2(), LoRA(r=2, target_modules=["wte"]),
                                                 PromptTuning(num_tokens=3, init="random")),
    "lora-then-prefix": lambda: inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"]), PrefixTuning(num_tokens=2)),
    "named-adapters": lambda: _named(inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"]))),
    "named-none-active": lambda: set_adapter(_named(inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"]))), None),
    "in-a-holder": lambda: inject(Holder(tiny_gpt2()), LoRA(r=2, target_modules=["c_attn"])),
    "activation-checkpointed": lambda: _checkpointed(inject(Holder(tiny_gpt2()), LoRA(r=2, target_modules=["c_attn"]))),
    "adapter-as-root": lambda: inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"])).transformer.h[0].attn.c_attn,
    "batchnorm-update": lambda: _bn(batchnorm="update"),
    "batchnorm-trained": lambda: _bn(trainable_modules=["1"]),
}


def tree_rule(model: nn.Module) -> set[str]:
    """The adapter tensors walked from the module tree: each adapter's own tensors (none under its ``base_layer``,
    nested adapters report theirs) and the tensors a module marked."""
    names: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{clean_name(name)}." if clean_name(name) else ""
        if isinstance(module, Adapter):
            names |= {prefix + local for local, _ in module.adapter_tensors()}
        names |= {prefix + local for local, _ in [*module.named_parameters(recurse=False),
                                                  *module.named_buffers(recurse=False)] if local in marked(module)}
    return names


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_names_decide_the_tensors_the_adapter_tree_holds(structure: str) -> None:
    model = STRUCTURES[structure]()
    is_adapter_tensor = adapter_name_test(model)
    expected = tree_rule(model)
    assert {name for name in model.state_dict() if is_adapter_tensor(clean_name(name))} == expected
    assert {name for name, _ in adapter_tensors(model)} == expected
    assert bool(expected) == (structure != "named-none-active")  # with no adapter active, nothing is saved


def test_a_compiled_submodule_keeps_its_adapter_tensors_in_checkpoints() -> None:
    model = inject(Holder(tiny_gpt2()), LoRA(r=2, target_modules=["c_attn"]))
    model.net = torch.compile(model.net)  # its state dict names carry "_orig_mod"
    checkpoint = {"state_dict": model.state_dict()}
    keep_adapter_tensors(model, checkpoint)  # type: ignore[arg-type]
    kept = sorted(checkpoint["state_dict"])
    assert len(kept) == 4 and all("._orig_mod." in k and ".lora_" in k for k in kept)
    assert checkpoint["lightning_peft"]["tensors"] == sorted(name for name, _ in adapter_tensors(model))
    check_adapter_state(model, checkpoint["state_dict"])  # the compiled names count as present
    with pytest.raises(AdapterStateError, match="missing 1 adapter tensors"):
        check_adapter_state(model, dict(list(checkpoint["state_dict"].items())[1:]))


@pytest.mark.parametrize("top", ["model", "state_dict"])  # FSDPStrategy, ModelParallelStrategy
def test_the_sharded_load_planner_skips_frozen_tensors_but_refuses_missing_adapter_tensors(
    tmp_path: Path, top: str
) -> None:
    lora = inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"]))
    with torch.no_grad():
        for name, tensor in lora.named_parameters():
            if "lora_" in name:
                tensor.add_(1.0)
    dcp.save({top: {k: v for k, v in lora.state_dict().items() if "lora_" in k}}, checkpoint_id=str(tmp_path))

    same = inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"]))
    state = {top: same.state_dict()}
    with _partial_sharded_load(types.SimpleNamespace(lightning_module=same)):
        dcp.load(state, checkpoint_id=str(tmp_path))  # the frozen weights are not in it: skipped
    for name, tensor in lora.state_dict().items():
        torch.testing.assert_close(state[top][name], tensor, rtol=0, atol=0, msg=name)  # adapters loaded

    other = inject(tiny_gpt2(), PrefixTuning(num_tokens=2))
    with pytest.raises(AdapterStateError, match=r"lacks 4 adapter tensors \(transformer\.h\.0\.attn\.prefix_keys"):
        with _partial_sharded_load(types.SimpleNamespace(lightning_module=other)):
            dcp.load({top: other.state_dict()}, checkpoint_id=str(tmp_path))

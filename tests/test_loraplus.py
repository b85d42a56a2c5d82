"""LoRA+ (lightning_peft.lora.plus.param_groups): every trainable tensor in one group, B factors at lr · ratio, an
optimizer built from the groups trains and resumes through a Lightning checkpoint."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import (
    LoRA,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    add_adapter,
    inject,
    param_groups,
    set_adapter,
)

transformers = pytest.importorskip("transformers")

B_NAMES = ("lora_B", "lora_out_B")  # the test names B factors by their attribute names; the code reads modules


def gpt2_all_methods() -> nn.Module:
    """A tiny GPT-2 with LoRA on Conv1D and the token embedding, trainable layer norms, prompts and prefixes."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=30, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(config)
    return inject(model, LoRAConfig(r=2, target_modules=["c_attn", "c_fc", "wte"], trainable_modules=["ln_f"]),
                  PromptTuningConfig(num_tokens=3), PrefixTuningConfig(num_tokens=2))


class Tiny(nn.Module):
    """Linear, Conv2d, Embedding and nn.MultiheadAttention, each adapted by LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (batch, seq, 8)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def tiny_lora(**kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return inject(Tiny(), LoRAConfig(r=2, target_modules=["emb", "conv", "attn", "head"], **kwargs))


def trainable(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def by_name(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Parameter name -> its group, asserting each parameter appears once over all groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, dict[str, Any]] = {}
    for group in groups:
        for param in group["params"]:
            assert names[id(param)] not in found, f"{names[id(param)]} is in two groups"
            found[names[id(param)]] = group
    return found


@pytest.mark.parametrize("make", [lambda: tiny_lora(bias="lora_only"), gpt2_all_methods],
                         ids=["lora-linear-conv-embedding-mha+biases", "gpt2-3-methods"])
def test_groups_hold_every_trainable_tensor_once_and_no_frozen_one(make: Callable[[], nn.Module]) -> None:
    model = make()
    groups = param_groups(model, lr=1e-3, loraplus_ratio=8.0)
    found = by_name(model, groups)
    assert set(found) == set(trainable(model).values())
    assert all(p.requires_grad for g in groups for p in g["params"])
    b_names = [n for n in found if n.rsplit(".", 1)[-1] in B_NAMES]
    assert b_names and all(found[n]["name"] == "lora_B" and found[n]["lr"] == pytest.approx(8e-3) for n in b_names)
    rest = [n for n in found if n not in b_names]
    assert rest and all(found[n]["lr"] == 1e-3 for n in rest)
    assert [g["name"] for g in groups] == ["lora_B", "default", "no_decay"]
    assert all(p.dim() < 2 for p in groups[2]["params"]) and all(p.dim() >= 2 for p in groups[1]["params"])


def test_several_methods_each_land_in_their_group() -> None:
    model = gpt2_all_methods()
    found = {name: group["name"] for name, group in by_name(model, param_groups(model, lr=1.0)).items()}
    assert found["transformer.wte.base_layer.lora_B"] == "lora_B"  # the embedding's output-side factor (dim, r)
    assert found["transformer.wte.base_layer.lora_A"] == "default"  # looked up per token, starts at zero
    assert found["transformer.h.0.attn.base_layer.c_attn.lora_B"] == "lora_B"  # GPT-2 Conv1D
    assert found["transformer.ln_f.weight"] == found["transformer.ln_f.bias"] == "no_decay"  # trainable_modules
    prompts = [n for n in found if "prompt" in n]
    prefixes = [n for n in found if "prefix" in n]
    assert prompts and prefixes and {found[n] for n in prompts + prefixes} == {"default"}


def test_mha_out_projection_and_embedding_b_factors_get_the_ratio() -> None:
    model = tiny_lora()
    found = by_name(model, param_groups(model, lr=0.01, loraplus_ratio=4.0))
    for name in ("emb.lora_B", "conv.lora_B", "attn.lora_B", "attn.lora_out_B", "head.lora_B"):
        assert found[name]["lr"] == pytest.approx(0.04), name
    for name in ("emb.lora_A", "conv.lora_A", "attn.lora_A", "attn.lora_out_A", "head.lora_A"):
        assert found[name]["lr"] == pytest.approx(0.01), name


def test_one_sgd_step_moves_b_by_ratio_times_lr_times_its_gradient() -> None:
    model = tiny_lora()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # B != 0 so A gets a gradient too
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, loraplus_ratio=16.0))
    ids = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(0))
    model(ids).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = 0.1 * 16 if name.rsplit(".", 1)[-1] in B_NAMES else 0.1
            torch.testing.assert_close(param.detach(), before[name] - lr * grads[name], atol=1e-6, rtol=1e-6)


def test_weight_decay_none_leaves_the_optimizers_own_and_no_decay_is_zero() -> None:
    model = tiny_lora(trainable_modules=["head"])
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3), weight_decay=0.05)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "lora_B": 0.05, "default": 0.05, "no_decay": 0.0}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = next(g for g in optimizer.param_groups if g["name"] == "no_decay")
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["head.base_layer.bias"]
    explicit = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.2), weight_decay=0.05)
    assert {g["name"]: g["weight_decay"] for g in explicit.param_groups} == {
        "lora_B": 0.2, "default": 0.2, "no_decay": 0.0}


def test_named_adapters_give_the_active_adapters_tensors_only() -> None:
    model = tiny_lora()
    first = set(trainable(model))
    add_adapter(model, "other", LoRAConfig(r=1, target_modules=["head"]))
    groups = param_groups(model, lr=1e-3)
    assert {id(p) for g in groups for p in g["params"]} == set(trainable(model))
    assert {n for n in by_name(model, groups)} == {"head.lora_A", "head.lora_B"}
    assert not first & {id(p) for g in groups for p in g["params"]}
    set_adapter(model, "default")
    assert {id(p) for g in param_groups(model, lr=1e-3) for p in g["params"]} == first


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(lr=0.0), "lr must be a positive"), (dict(lr=1e-3, loraplus_ratio=-1.0), "loraplus_ratio must be"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be >= 0"),
])
def test_bad_arguments_raise(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups(tiny_lora(), **kwargs)


def test_a_model_without_trainable_tensors_raises() -> None:
    with pytest.raises(ValueError, match="nothing in Linear requires grad"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


def test_adamw_from_the_groups_lowers_the_loss_on_a_tiny_task() -> None:
    model = tiny_lora()
    torch.manual_seed(5)
    teacher = Tiny()  # other weights: the adapters must move the model towards it
    ids = torch.randint(0, 12, (32, 5), generator=torch.Generator().manual_seed(1))
    target = teacher(ids).detach()
    optimizer = torch.optim.AdamW(param_groups(model, lr=3e-3, weight_decay=0.0))
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(ids), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Tiny()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, target = batch
        return F.mse_loss(self.net(ids), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self, lr=1e-3, loraplus_ratio=16.0, weight_decay=0.01))


def test_optimizer_state_checkpoints_and_resumes_through_lightning(make_trainer: Callable[..., Any],
                                                                   tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.randint(0, 12, (16, 5), generator=torch.Generator().manual_seed(2))
    data = DataLoader(TensorDataset(ids, torch.randn(16, 3)), batch_size=4)
    lora: dict[str, Any] = dict(r=2, target_modules=["emb", "conv", "attn", "head"], bias="lora_only")
    first = make_trainer(callbacks=[LoRA(**lora)])
    first.fit(Module(), data)
    saved = first.optimizers[0].state_dict()
    path = tmp_path / "step2.ckpt"
    first.save_checkpoint(path)
    assert [g["name"] for g in torch.load(path, weights_only=False)["optimizer_states"][0]["param_groups"]] == [
        "lora_B", "default", "no_decay"]

    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            seen["state"] = copy.deepcopy(trainer.optimizers[0].state_dict())

    second = make_trainer(callbacks=[LoRA(**lora), Probe()], max_epochs=2)
    second.fit(Module(), data, ckpt_path=path)
    restored = seen["state"]
    assert [(g["name"], g["lr"], g["params"]) for g in restored["param_groups"]] == [
        (g["name"], g["lr"], g["params"]) for g in saved["param_groups"]]
    assert restored["param_groups"][0]["lr"] == pytest.approx(16e-3)
    assert set(restored["state"]) == set(saved["state"]) and saved["state"]
    for index, state in saved["state"].items():
        torch.testing.assert_close(restored["state"][index]["exp_avg"], state["exp_avg"], atol=0, rtol=0)
    assert second.global_step == 4  # resumed at step 2, two more steps ran

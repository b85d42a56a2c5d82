"""The method callbacks in real ``Trainer.fit`` runs: what trains, when injection happens, composition,
the model summary, both Lightning namespaces, and hooks that survive copying."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from glue_models import TARGETS, LateTask, PEFTTask, Task, family_lora
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_summary import ModelSummary

from lightning_peft import LoRA, adapter_state_dict, trainable_summary
from lightning_peft.adapter import adapters, is_injected
from lightning_peft.injection import applied_methods


class Snapshot(L.Callback):
    """Copies every parameter and buffer when training starts (after injection and strategy set-up)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tensors = [*pl_module.named_parameters(), *pl_module.named_buffers()]
        self.start = {name: tensor.detach().clone() for name, tensor in tensors}


def _probe_strategy_setup(trainer: L.Trainer) -> list[bool]:
    """Record, at the moment ``strategy.setup`` runs, whether the module already holds adapters."""
    seen: list[bool] = []
    original = trainer.strategy.setup

    def setup(tr: L.Trainer) -> None:
        seen.append(is_injected(tr.lightning_module))
        original(tr)

    trainer.strategy.setup = setup  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("family", ["resnet18", "minilm", "gpt2"])
def test_fit_changes_every_adapter_and_trainable_tensor_and_nothing_else(
    family: str, make_trainer: Callable[..., L.Trainer]
) -> None:
    module, snapshot = Task(family=family, lr=1e-2), Snapshot()
    trainer = make_trainer(callbacks=[family_lora(family), snapshot])
    trainer.fit(module)

    trainable_prefixes = tuple(f"{n}." for n, _ in module.named_modules() if n.split(".")[-1] in (TARGETS[family][1] or []))
    after = dict([*module.named_parameters(), *module.named_buffers()])
    learned = {n for n in after if "lora_" in n or n.startswith(trainable_prefixes)}
    assert {n for n in learned if "lora_" in n}, "no adapter was injected"
    assert learned == {n for n, p in module.named_parameters() if p.requires_grad}
    for name, start in snapshot.start.items():
        changed = not torch.equal(after[name], start)
        assert changed == (name in learned), f"{name}: changed={changed}, expected {name in learned}"


@pytest.mark.parametrize("task_cls", [Task, LateTask], ids=["built_in_init", "built_in_configure_model"])
def test_injection_happens_before_strategy_setup_and_the_optimizer(
    task_cls: type[Task], make_trainer: Callable[..., L.Trainer]
) -> None:
    module = task_cls(family="mlp")
    trainer = make_trainer(callbacks=[family_lora("mlp")])
    seen = _probe_strategy_setup(trainer)
    trainer.fit(module)
    assert seen == [True]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    expected = {id(p) for n, p in module.named_parameters() if "lora_" in n or n.startswith("classifier.")}
    assert optimized == expected
    assert sorted(n for n, _ in adapters(module)) == ["backbone.0", "backbone.2"]


@pytest.mark.parametrize("task_cls", [Task, LateTask], ids=["built_in_init", "built_in_configure_model"])
def test_two_lora_callbacks_compose_with_their_own_targets_ranks_and_state(
    task_cls: type[Task], make_trainer: Callable[..., L.Trainer], tmp_path: Any
) -> None:
    first = LoRA(r=2, target_modules=["backbone.0"], trainable_modules=["classifier"])
    second = LoRA(r=3, target_modules=["backbone.2"])
    assert first.state_key != second.state_key
    module = task_cls(family="mlp")
    trainer = make_trainer(callbacks=[first, second])
    trainer.fit(module)
    assert applied_methods(module) == [first, second]
    ranks = {name: adapter.r for name, adapter in adapters(module)}
    assert ranks == {"backbone.0": 2, "backbone.2": 3}
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)
    assert saved["callbacks"][first.state_key] == {"config": first.to_dict()}
    assert saved["callbacks"][second.state_key] == {"config": second.to_dict()}
    assert set(saved["state_dict"]) == set(adapter_state_dict(module))


def test_model_summary_counts_equal_trainable_summary_and_the_closed_form(make_trainer: Callable[..., L.Trainer]) -> None:
    module = Task(family="mlp", hidden=32, layers=2)
    trainer = make_trainer(callbacks=[family_lora("mlp", r=4)], enable_model_summary=True)
    trainer.fit(module)
    summary, ours = ModelSummary(module), trainable_summary(module)
    lora = 4 * (8 + 32) + 4 * (32 + 32)  # r * (in + out) per adapted Linear
    head = 32 * 3 + 3
    base = (8 * 32 + 32) + (32 * 32 + 32) + head
    assert (summary.trainable_parameters, summary.total_parameters) == (ours.trainable, ours.total)
    assert (ours.trainable, ours.total, ours.adapter) == (lora + head, base + lora, lora)


def test_callback_works_on_a_pytorch_lightning_trainer_and_module(tmp_path: Any) -> None:
    import pytorch_lightning as pl

    class PLTask(pl.LightningModule):  # pytorch_lightning namespace, layers built in configure_model
        def __init__(self) -> None:
            super().__init__()
            self.task = Task(family="mlp")  # reuse the data and loss; the backbone is built below

        def configure_model(self) -> None:
            self.extra = getattr(self, "extra", None) or torch.nn.Linear(3, 3)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.task.training_step(batch, batch_idx) + self.extra(torch.ones(1, 3)).sum() * 0

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

        def train_dataloader(self) -> Any:
            return self.task.train_dataloader()

    callback = LoRA(r=2, target_modules=["task.backbone.0", "extra"], trainable_modules=["task.classifier"])
    assert isinstance(callback, pl.Callback) and isinstance(callback, L.Callback)
    module = PLTask()
    trainer = pl.Trainer(  # a single callback, not a list: pytorch_lightning's Trainer checks its own Callback class
        callbacks=callback, accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert sorted(n for n, _ in adapters(module)) == ["extra", "task.backbone.0"]
    path = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    assert set(torch.load(path, weights_only=False)["state_dict"]) == set(adapter_state_dict(module))


def _set_up(module: L.LightningModule, *callbacks: LoRA) -> None:
    for callback in callbacks:  # what Trainer.fit does first, without a Trainer
        callback.setup(None, module, "fit")  # type: ignore[arg-type]


class SavesItsOwnWeights(SingleDeviceStrategy):
    """A strategy that writes module weights itself, as DeepSpeed does (``exclude_frozen_parameters``)."""

    exclude_frozen_parameters = False


def test_every_fit_makes_its_strategy_save_only_what_trains(make_trainer: Callable[..., L.Trainer]) -> None:
    module = Task(family="mlp")
    make_trainer(callbacks=[family_lora("mlp")]).fit(module)
    later = SavesItsOwnWeights(device=torch.device("cpu"))  # a new Trainer for the already adapted module
    make_trainer(callbacks=[family_lora("mlp")], strategy=later).fit(module)
    assert later.exclude_frozen_parameters is True
    assert len(applied_methods(module)) == 1
    mixin_module, again = PEFTTask(family="mlp"), SavesItsOwnWeights(device=torch.device("cpu"))
    make_trainer().fit(mixin_module)
    make_trainer(strategy=again).fit(mixin_module)  # the mixin's second fit prepares its strategy too
    assert again.exclude_frozen_parameters is True and len(applied_methods(mixin_module)) == 1


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_deferred_injection_survives_copying_and_acts_on_the_copy(clone: Callable[[Any], Any]) -> None:
    module = LateTask(family="mlp")
    _set_up(module, family_lora("mlp"))
    copied = clone(module)
    copied.configure_model()  # what the Trainer calls next
    assert sorted(n for n, _ in adapters(copied)) == ["backbone.0", "backbone.2"]
    assert not hasattr(module, "backbone"), "the copy's hook ran on the original"
    checkpoint = {"state_dict": copied.state_dict()}
    copied.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(copied))
    module.configure_model()
    assert sorted(n for n, _ in adapters(module)) == ["backbone.0", "backbone.2"]


def test_injection_is_idempotent_per_method_across_fits_copies_and_repeated_setup(
    make_trainer: Callable[..., L.Trainer],
) -> None:
    callback = family_lora("mlp")
    module = LateTask(family="mlp")
    _set_up(module, callback, callback)  # set up twice: one deferred injection, one hook step
    assert [s.__name__ for s in module.__dict__["configure_model"].steps] == ["_inject_pending"]
    make_trainer(callbacks=[callback]).fit(module)
    trained = adapter_state_dict(module)
    again = copy.deepcopy(module)
    make_trainer(callbacks=[family_lora("mlp")], max_epochs=2).fit(again)  # an equal method: nothing new injected
    for model in (module, again):
        assert sorted(n for n, _ in adapters(model)) == ["backbone.0", "backbone.2"]
        assert not any("base_layer.base_layer" in n for n, _ in model.named_parameters())
    assert len(applied_methods(again)) == 1
    assert any(not torch.equal(trained[n], t) for n, t in adapter_state_dict(again).items()), "second fit trained nothing"


def test_inject_before_fully_shard_injects_once_before_the_first_shard_and_restores_fully_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch.distributed.fsdp as torch_fsdp

    from lightning_peft.glue.strategies import inject_before_fully_shard

    events: list[str] = []

    def recorded_fully_shard(module: torch.nn.Module) -> torch.nn.Module:
        events.append(f"shard {type(module).__name__}")
        return module

    monkeypatch.setattr(torch_fsdp, "fully_shard", recorded_fully_shard)

    class Sharded(torch.nn.Module):
        def configure_model(self) -> None:
            for block in (torch.nn.Linear(2, 2), torch.nn.ReLU()):
                torch_fsdp.fully_shard(block)  # per block, as Lightning's FSDP2 pattern does

    module = Sharded()
    with inject_before_fully_shard(module, lambda: events.append("inject")):  # type: ignore[arg-type]
        module.configure_model()
    assert events == ["inject", "shard Linear", "shard ReLU"]
    assert torch_fsdp.fully_shard is recorded_fully_shard  # put back after configure_model

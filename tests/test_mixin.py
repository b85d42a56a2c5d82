"""PEFTMixin: injection from the module side, and load_from_checkpoint of adapter-only checkpoints."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from glue_models import LateTask, PEFTLateTask, PEFTTask, Task, dataset, family_lora
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import AdapterStateError, BaseModelMismatchError, LoRA, PEFTMixin, adapter_state_dict
from lightning_peft.adapter import adapters, is_injected
from lightning_peft.injection import applied_methods


def _fit_and_save(module: L.LightningModule, make_trainer: Callable[..., L.Trainer], path: Path, **kw: Any) -> Path:
    saver = ModelCheckpoint(dirpath=path, **kw)
    make_trainer(callbacks=[saver], enable_checkpointing=True).fit(module)
    return Path(saver.best_model_path)


@pytest.mark.parametrize("task_cls", [PEFTTask, PEFTLateTask], ids=["mixin_configure_model", "user_configure_model"])
def test_mixin_injects_configure_peft_methods_before_strategy_setup(
    task_cls: type[PEFTTask], make_trainer: Callable[..., L.Trainer]
) -> None:
    module = task_cls(family="mlp")
    trainer = make_trainer()
    seen: list[bool] = []
    original = trainer.strategy.setup
    trainer.strategy.setup = lambda tr: (seen.append(is_injected(tr.lightning_module)), original(tr))[1]  # type: ignore[method-assign]
    trainer.fit(module)
    assert seen == [True]
    assert sorted(n for n, _ in adapters(module)) == ["backbone.0", "backbone.2"]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in module.named_parameters() if "lora_" in n or n.startswith("classifier.")}


@pytest.mark.parametrize("family", ["mlp", "gpt2"])
@pytest.mark.parametrize("weights_only", [False, True], ids=["full_checkpoint", "save_weights_only"])
def test_load_from_checkpoint_rebuilds_adapters_and_reproduces_outputs(
    family: str, weights_only: bool, make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    trained = PEFTTask(family=family, lr=3e-2)
    path = _fit_and_save(trained, make_trainer, tmp_path, save_weights_only=weights_only)
    assert set(torch.load(path, weights_only=False)["state_dict"]) == set(adapter_state_dict(trained))

    loaded = PEFTTask.load_from_checkpoint(path)  # strict loading: every model key must be accounted for
    fresh = PEFTTask(family=family)
    fresh.apply_peft()
    for name, tensor in adapter_state_dict(trained).items():
        assert torch.equal(adapter_state_dict(loaded)[name], tensor), name
    assert any(not torch.equal(adapter_state_dict(fresh)[n], t) for n, t in adapter_state_dict(trained).items())
    inputs = dataset(family).tensors[0][:4]
    trained.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs), trained(inputs))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden": 48}, r"differ in shape \(backbone\.0\.weight: saved \[32, 8\], model \[48, 8\]"),
        ({"layers": 3}, r"model tensors were not in the saved base \(backbone\.4\.weight, backbone\.4\.bias"),
    ],
    ids=["other_hidden_size", "more_layers"],
)
def test_load_from_checkpoint_into_another_base_model_fails_naming_what_differs(
    change: dict[str, int], message: str, make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    path = _fit_and_save(PEFTTask(family="mlp"), make_trainer, tmp_path)
    with pytest.raises(BaseModelMismatchError, match=message):
        PEFTTask.load_from_checkpoint(path, **change)


def test_load_from_checkpoint_missing_adapter_tensors_fails_naming_them(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    path = _fit_and_save(PEFTTask(family="mlp"), make_trainer, tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["state_dict"]["backbone.0.lora_A"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(AdapterStateError, match=r"missing 1 adapter tensors \(backbone\.0\.lora_A\)"):
        PEFTTask.load_from_checkpoint(tmp_path / "broken.ckpt")


class OwnHooks(PEFTTask):
    """Overrides both checkpoint hooks without calling super(): the PEFT steps must still run."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mine"] = 1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_mine = checkpoint["mine"]


def test_user_checkpoint_hooks_without_super_keep_checkpoints_adapter_only(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    trained = OwnHooks(family="mlp")
    path = _fit_and_save(trained, make_trainer, tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["mine"] == 1 and "lightning_peft" in checkpoint
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(trained))
    loaded = OwnHooks.load_from_checkpoint(path)
    assert loaded.loaded_mine == 1
    assert torch.equal(adapter_state_dict(loaded)["backbone.0.lora_B"], adapter_state_dict(trained)["backbone.0.lora_B"])


def test_mixin_works_on_a_pytorch_lightning_module(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    class PLTask(PEFTMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def configure_peft(self) -> list[LoRA]:
            return [LoRA(r=2, target_modules=["net.0"], trainable_modules=["net.2"])]

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(dataset("mlp"), batch_size=4)

    module = PLTask()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    assert [n for n, _ in adapters(module)] == ["net.0"]
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)  # type: ignore[union-attr]
    assert set(checkpoint["state_dict"]) == {"net.0.lora_A", "net.0.lora_B", "net.2.weight", "net.2.bias"}


class ParentHooks(PEFTLateTask):
    """Hooks that call super(): the PEFT steps must run once per hook call, after the whole chain."""

    def apply_peft(self) -> None:
        self.applied = getattr(self, "applied", 0) + 1
        super().apply_peft()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint.setdefault("chain", []).append("parent")


class ChildHooks(ParentHooks):
    """Builds a target layer after super().configure_model(): injecting inside the chain would miss it."""

    def configure_model(self) -> None:
        super().configure_model()
        if not hasattr(self, "extra"):
            self.extra = torch.nn.Linear(8, 8)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["chain"].append("child")

    def configure_peft(self) -> list[LoRA]:
        return [LoRA(r=2, target_modules=["backbone.0", "extra"], trainable_modules=["classifier"])]


def test_nested_super_chains_run_each_peft_step_once_after_all_of_the_users_code(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    trained = ChildHooks(family="mlp")
    path = _fit_and_save(trained, make_trainer, tmp_path)
    assert trained.applied == 1  # one configure_model call: one apply_peft, not one per class of the chain
    assert sorted(n for n, _ in adapters(trained)) == ["backbone.0", "extra"]
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["chain"] == ["parent", "child"]
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(trained))
    base = ChildHooks(family="mlp")
    ChildHooks.configure_model(base)  # through the class: the same layers, without the instance's PEFT steps
    assert not is_injected(base)
    # the fingerprint of the whole base: keep_adapter_tensors ran once, on the full state dict (a second run would
    # have seen only the adapter and classifier tensors the first kept)
    assert checkpoint["lightning_peft"]["base_shapes"] == {n: list(t.shape) for n, t in base.state_dict().items()}
    loaded = ChildHooks.load_from_checkpoint(path)
    assert loaded.applied == 2  # configure_model, then on_load_checkpoint (which finds the methods applied)
    for name, tensor in adapter_state_dict(trained).items():
        assert torch.equal(adapter_state_dict(loaded)[name], tensor), name


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copied_mixin_module_runs_its_peft_steps_on_the_copy(clone: Callable[[Any], Any]) -> None:
    module = PEFTLateTask(family="mlp")
    copied = clone(module)
    copied.configure_model()  # what the Trainer calls
    assert sorted(n for n, _ in adapters(copied)) == ["backbone.0", "backbone.2"]
    assert not hasattr(module, "backbone"), "the copy's hook ran on the original"
    checkpoint = {"state_dict": copied.state_dict()}
    copied.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(copied))
    again = clone(copied)  # an adapted module: its copy injects nothing twice
    again.configure_model()
    assert not any("base_layer.base_layer" in n for n, _ in again.named_parameters())
    assert adapter_state_dict(again).keys() == adapter_state_dict(copied).keys()


def test_a_callback_next_to_the_mixin_adds_no_second_checkpoint_step(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    trained = PEFTTask(family="mlp")
    saver = ModelCheckpoint(dirpath=tmp_path)
    make_trainer(callbacks=[saver, family_lora("mlp")], enable_checkpointing=True).fit(trained)  # the same LoRA
    assert len(applied_methods(trained)) == 1
    checkpoint = torch.load(saver.best_model_path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(trained))
    base = {n: list(t.shape) for n, t in Task(family="mlp").state_dict().items()}
    assert checkpoint["lightning_peft"]["base_shapes"] == base  # one keep_adapter_tensors, on the full state dict


@pytest.mark.parametrize(("task_cls", "adapted"), [(PEFTLateTask, True), (LateTask, False)], ids=["mixin", "plain"])
def test_spawn_recovery_adapts_a_main_process_mixin_module_and_leaves_a_plain_one(
    task_cls: type[L.LightningModule], adapted: bool
) -> None:
    from lightning_peft.spawn import _adapt_main_process_module

    module = task_cls(family="mlp")  # the main process's module: its workers ran configure_model, it did not
    trainer = SimpleNamespace(callbacks=[ModelCheckpoint()])  # no method callbacks
    assert _adapt_main_process_module(trainer, module) is adapted
    assert sorted(n for n, _ in adapters(module)) == (["backbone.0", "backbone.2"] if adapted else [])

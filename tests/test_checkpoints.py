"""Adapter-only Lightning checkpoints: what they hold, exact resume, and refusing another base model."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from glue_models import LateTask, PEFTTask, Task, family_lora
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import AdapterStateError, BaseModelMismatchError, LoRA, adapter_state_dict


def _size(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


@pytest.mark.parametrize("weights_only", [False, True], ids=["full_checkpoint", "save_weights_only"])
def test_model_checkpoint_holds_only_adapter_and_trainable_tensors_with_metadata(
    weights_only: bool, make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    module, lora = Task(family="resnet18"), family_lora("resnet18")
    full_size = _size(module.state_dict())
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=weights_only)
    make_trainer(callbacks=[lora, saver], enable_checkpointing=True).fit(module)
    checkpoint = torch.load(saver.best_model_path, weights_only=False)

    state = checkpoint["state_dict"]
    assert set(state) == set(adapter_state_dict(module))
    assert all(".lora_" in k or k.startswith("backbone.fc.") for k in state) and "backbone.fc.weight" in state
    for name, tensor in adapter_state_dict(module).items():
        assert torch.equal(state[name], tensor)
    meta = checkpoint["lightning_peft"]
    assert meta["methods"] == [lora.to_dict()]
    assert meta["base_shapes"]["backbone.conv1.weight"] == [64, 3, 7, 7]
    assert meta["base_shapes"]["backbone.layer4.1.bn2.running_var"] == [512]
    assert meta["base_shapes"]["backbone.fc.weight"] == [10, 512]  # the base model's shapes, under their own names
    assert not any(".lora_" in name or ".base_layer." in name for name in meta["base_shapes"])
    assert ("optimizer_states" in checkpoint) != weights_only
    assert Path(saver.best_model_path).stat().st_size < full_size / 10


def _fit_gpt2(make_trainer: Callable[..., L.Trainer], max_epochs: int, ckpt_path: Path | None = None) -> L.Trainer:
    module = Task(family="gpt2", lr=3e-2)  # Adam: its moments must be restored too; no dropout, no shuffling
    trainer = make_trainer(callbacks=[family_lora("gpt2")], max_epochs=max_epochs, limit_train_batches=2)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_resume_from_a_run_cut_at_step_k_ends_bitwise_equal_to_an_uninterrupted_run(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    # The cut is at an epoch end (k = 2 steps): Lightning itself restarts a plain DataLoader mid-epoch.
    uninterrupted = _fit_gpt2(make_trainer, max_epochs=3)
    cut = _fit_gpt2(make_trainer, max_epochs=1)
    assert cut.global_step == 2
    cut.save_checkpoint(tmp_path / "cut.ckpt")
    assert set(torch.load(tmp_path / "cut.ckpt", weights_only=False)["state_dict"]) == set(
        adapter_state_dict(cut.lightning_module)
    )
    resumed = _fit_gpt2(make_trainer, max_epochs=3, ckpt_path=tmp_path / "cut.ckpt")

    expected, got = adapter_state_dict(uninterrupted.lightning_module), adapter_state_dict(resumed.lightning_module)
    assert resumed.global_step == uninterrupted.global_step == 6
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    cut_state = adapter_state_dict(cut.lightning_module)
    assert any(not torch.equal(cut_state[n], expected[n]) for n in expected), "the resumed run trained nothing"


def test_resuming_into_another_base_model_fails_naming_what_differs(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    module = Task(family="mlp", hidden=32)
    trainer = make_trainer(callbacks=[family_lora("mlp")])
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "mlp.ckpt")
    other = make_trainer(callbacks=[family_lora("mlp")], max_epochs=2)
    with pytest.raises(BaseModelMismatchError, match=r"differ in shape \(backbone\.0\.weight: saved \[32, 8\], model \[48, 8\]"):
        other.fit(Task(family="mlp", hidden=48), ckpt_path=tmp_path / "mlp.ckpt")


def test_resuming_from_a_checkpoint_missing_adapter_tensors_fails_naming_them(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    trainer = make_trainer(callbacks=[family_lora("mlp")])
    trainer.fit(Task(family="mlp"))
    trainer.save_checkpoint(tmp_path / "mlp.ckpt")
    checkpoint = torch.load(tmp_path / "mlp.ckpt", weights_only=False)
    del checkpoint["state_dict"]["backbone.2.lora_B"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    other = make_trainer(callbacks=[family_lora("mlp")], max_epochs=2)
    with pytest.raises(AdapterStateError, match=r"missing 1 adapter tensors \(backbone\.2\.lora_B\)"):
        other.fit(Task(family="mlp"), ckpt_path=tmp_path / "broken.ckpt")


class EveryStage(Task):
    """The task with validation, test and predict steps, on its training data."""

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)

    test_step = validation_step

    def predict_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    val_dataloader = test_dataloader = predict_dataloader = Task.train_dataloader


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_a_checkpoint_of_other_adapters_is_refused_in_every_stage_naming_what_differs(
    stage: str, make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    # fewer targets than the checkpoint holds: predict used to warn and compute with half the adapters
    trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["backbone.0", "backbone.2"])])
    trainer.fit(EveryStage(family="mlp"))
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    fewer = make_trainer(callbacks=[LoRA(r=2, target_modules=["backbone.0"])], max_epochs=2, limit_val_batches=1,
                         limit_test_batches=1, limit_predict_batches=1)
    with pytest.raises(AdapterStateError, match=r"saved with lora target_modules=\['backbone\.0', 'backbone\.2'\] "
                                                r"\(the model has target_modules=\['backbone\.0'\]\)"):
        getattr(fewer, stage)(EveryStage(family="mlp"), ckpt_path=tmp_path / "two.ckpt")


@pytest.mark.parametrize("module_class", [LateTask, PEFTTask], ids=["callback, layers built in configure_model",
                                                                    "mixin"])
def test_load_from_checkpoint_rebuilds_late_built_and_mixin_modules_with_their_outputs(
    module_class: type[Task], make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    from lightning_peft import load_from_checkpoint

    trained = module_class(family="mlp")
    callbacks = [] if module_class is PEFTTask else [family_lora("mlp")]
    trainer = make_trainer(callbacks=callbacks)
    trainer.fit(trained)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    rebuilt = load_from_checkpoint(module_class, tmp_path / "run.ckpt").eval()
    with torch.no_grad():
        expected = trained.eval()(x)
        assert torch.equal(rebuilt(x), expected)
        assert not torch.equal(module_class(family="mlp").eval()(x) if module_class is PEFTTask else
                               Task(family="mlp").eval()(x), expected)  # training changed the outputs

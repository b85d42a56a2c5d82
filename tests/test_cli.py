"""LightningCLI reads every method callback from YAML (``class_path: lightning_peft.LoRA``) and ``fit`` trains it."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

import lightning_peft
from lightning_peft import inject
from lightning_peft.injection import applied_methods
from lightning_peft.methods import Method

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter:UserWarning")

EXAMPLES = Path(__file__).parents[1] / "examples"
CONFIGS = EXAMPLES / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def example_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lightning_peft_example_cli", EXAMPLES / "cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse resolves the model's class through its module
    spec.loader.exec_module(module)
    return module


def short_run(tmp_path: Path) -> list[str]:
    return ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}", *QUIET]


def yaml_callbacks(config: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(config.read_text())["trainer"]["callbacks"]


def original_name(name: str) -> str:
    """The name a tensor had before injection (adapters keep the wrapped layer as ``base_layer``)."""
    return name.replace("base_layer.", "")


def fit_and_compare(cli: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``fit`` on the parsed CLI; return (weights before, weights right after injection, weights after fit).

    The injected start is rebuilt on a copy: adapter initialisation is seeded per layer name, so it is the same.
    """
    before = {n: t.clone() for n, t in cli.model.state_dict().items()}
    reference = copy.deepcopy(cli.model)
    methods = [cb for cb in cli.trainer.callbacks if isinstance(cb, Method)]
    initial = {n: t.clone() for n, t in inject(reference, *methods).state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = {n: t.detach().clone() for n, t in cli.model.state_dict().items()}
    return before, initial, after


@pytest.mark.parametrize("config", ["lora_cli.yaml", "prefix_cli.yaml", "prompt_cli.yaml"])
def test_yaml_config_builds_the_same_callback_as_python_and_fit_trains_only_its_adapters_and_head(
    example_cli: ModuleType, tmp_path: Path, config: str
) -> None:
    cli = example_cli.cli_main(["--config", str(CONFIGS / config), *short_run(tmp_path)], run=False)
    (spec,) = yaml_callbacks(CONFIGS / config)
    methods = [cb for cb in cli.trainer.callbacks if type(cb).__module__ == "lightning_peft.callbacks"]
    assert len(methods) == 1
    expected = getattr(lightning_peft, spec["class_path"].rsplit(".", 1)[1])(**spec["init_args"])
    assert type(methods[0]) is type(expected) and methods[0].to_dict() == expected.to_dict()

    before, initial, after = fit_and_compare(cli)

    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    new = {n for n in trainable if original_name(n) not in before}
    assert new, "the method added no trainable tensor"
    assert trainable - new == {"head.weight", "head.bias"}  # besides adapters, only trainable_modules train
    for name in trainable:
        assert not torch.equal(after[name], initial[name]), f"{name} did not change in fit"
    for name, tensor in after.items():
        if name not in trainable and original_name(name) in before:
            assert torch.equal(tensor, before[original_name(name)]), f"frozen {name} changed in fit"


def test_lora_yaml_lists_dicts_and_choices_reach_the_adapters(example_cli: ModuleType, tmp_path: Path) -> None:
    cli = example_cli.cli_main(["--config", str(CONFIGS / "lora_cli.yaml"), *short_run(tmp_path)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ranks = {name: adapter.lora_A.shape[0] for name, adapter in lightning_peft.adapters(cli.model) if hasattr(adapter, "lora_A")}
    for i in range(2):  # target_modules [self_attn, linear1, linear2], rank_pattern {linear2: 2}, r 4
        block = f"encoder.layers.{i}"
        assert ranks[f"{block}.linear1"] == 4 and ranks[f"{block}.linear2"] == 2
        assert any(name.startswith(f"{block}.self_attn") for name in ranks)
    assert all(not name.startswith("stem") and not name.startswith("head") for name in ranks)


def test_callbacks_appended_on_the_command_line_compose(example_cli: ModuleType, tmp_path: Path) -> None:
    extra = ["--trainer.callbacks+=lightning_peft.PromptTuning", "--trainer.callbacks.kind=pixels",
             "--trainer.callbacks.width=1", "--trainer.callbacks.image_size=[8, 8]"]
    cli = example_cli.cli_main(["--config", str(CONFIGS / "lora_cli.yaml"), *extra, *short_run(tmp_path)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [type(m).__name__ for m in applied_methods(cli.model)] == ["LoRA", "PromptTuning"]
    frame = {n: p for n, p in cli.model.named_parameters() if n.startswith("stem.prompt_")}
    # a 1-pixel frame around 8x8 images of 1 channel: 8 + 8 + 6 + 6 pixels, all trained away from zero
    assert sum(p.numel() for p in frame.values()) == 28 and all(p.requires_grad and p.abs().sum() > 0 for p in frame.values())


def test_a_choice_outside_the_literal_fails_before_training_with_the_allowed_values(
    example_cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((CONFIGS / "lora_cli.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["init"] = "orthogonal"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        example_cli.cli_main(["--config", str(bad), *short_run(tmp_path)], run=False)
    err = capsys.readouterr().err
    assert "orthogonal" in err and "'default', 'gaussian', 'pissa'" in err


def test_the_standalone_pytorch_lightning_cli_reads_the_callback_from_yaml(tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.demos.boring_classes import BoringDataModule, BoringModel

    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning_peft.LoRA", "init_args": {"r": 2, "target_modules": ["layer"]}}]}}))
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=[
        "--config", str(config), "--trainer.max_steps=2", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_checkpointing=false", *QUIET])
    base = cli.model.layer.weight.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    layer = cli.model.layer
    assert type(layer).__name__ == "LoRALinear" and layer.lora_A.shape == (2, base.shape[1])
    assert layer.lora_B.abs().sum() > 0  # B starts at zero: it moved
    assert torch.equal(layer.base_layer.weight, base)

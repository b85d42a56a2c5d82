"""LoRA vs full finetuning vs a linear probe, in Lightning, on data and a model that ship offline.

The task is honest transfer: a torchvision ResNet-18 is first trained (from random weights) on the handwritten
digits 0-4 of scikit-learn's ``load_digits`` (8x8 images upsampled to 32x32), then adapted to recognise the
*other* digits 5-9 from a small labelled set. Three ways to adapt the same pretrained backbone on the same
split and seed:

* LoRA:           ``LoRA(r=8, target_modules="all-conv", trainable_modules=["fc"])`` as a Trainer callback;
* full finetuning: every weight trains;
* linear probe:    the backbone is frozen, only a new head trains.

Run ``python examples/resnet_digits_lora.py`` (about 2-3 minutes on 2 CPU cores) or ``--quick`` (< 30 s).
"""

from __future__ import annotations

import argparse
import copy
import io
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from common import digits_transfer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_peft import LoRA, adapter_state_dict, merge_and_unload, trainable_summary


class Classifier(L.LightningModule):
    """A ResNet-18 classifier; with ``probe=True`` only its head trains (backbone frozen, in eval mode)."""

    def __init__(self, net: nn.Module, lr: float, epochs: int, probe: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.epochs, self.probe = net, lr, epochs, probe
        if probe:
            for name, param in net.named_parameters():
                param.requires_grad_(name.startswith("fc."))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_train_epoch_start(self) -> None:
        if self.probe:
            self.net.eval()  # frozen BatchNorm statistics, as the LoRA callback's default keeps them

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-4)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)}


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    metric = MulticlassAccuracy(num_classes=int(data.tensors[1].max()) + 1, average="micro")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for images, labels in DataLoader(data, batch_size=256):
            metric.update(model(images), labels)
    model.train(was_training)  # a model measured between fits starts the next one in training mode
    return float(metric.compute())


def fit(module: L.LightningModule, data: TensorDataset, epochs: int, seed: int, callbacks: list | None = None) -> float:
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks or [], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def nbytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


@dataclass
class Row:
    method: str
    accuracy: float
    trainable: int
    total: int
    saved_bytes: int
    seconds: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 30 s): 1 epoch each, far less accurate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain_epochs, finetune_epochs = (1, 1) if args.quick else (4, 10)

    from torchvision.models import resnet18

    source, train, test = digits_transfer(size=32, labels_per_class=40, seed=args.seed)
    if args.quick:  # a smoke run: a third of the source images, 1 epoch each
        source = TensorDataset(*(t[:300] for t in source.tensors))
    print(f"data: {len(source)} source images (digits 0-4), {len(train)} target train / {len(test)} target test "
          f"images (digits 5-9)")
    torch.manual_seed(args.seed)
    backbone = resnet18(num_classes=5)
    pretrain_time = fit(Classifier(backbone, lr=2e-3, epochs=pretrain_epochs), source, pretrain_epochs, args.seed)
    print(f"pretrained ResNet-18 on digits 0-4 in {pretrain_time:.0f} s "
          f"(train accuracy {accuracy(backbone, source):.3f})")

    rows = []
    for method, lr in [("LoRA r=8, all convs + head", 3e-3), ("full finetuning", 1e-3), ("linear probe", 1e-2)]:
        net = copy.deepcopy(backbone)
        torch.manual_seed(args.seed)
        net.fc = nn.Linear(net.fc.in_features, 5)  # a new head for digits 5-9, the same init for every method
        callbacks = [LoRA(r=8, alpha=16, target_modules="all-conv", trainable_modules=["fc"])] if "LoRA" in method else []
        module = Classifier(net, lr=lr, epochs=finetune_epochs, probe=method == "linear probe")
        seconds = fit(module, train, finetune_epochs, args.seed, callbacks)
        counts = trainable_summary(module)
        saved = adapter_state_dict(module) if callbacks else {
            n: t for n, t in module.state_dict().items() if method != "linear probe" or n.startswith("net.fc.")
        }
        rows.append(Row(method, accuracy(module, test), counts.trainable, counts.total, nbytes(saved), seconds))
        if callbacks:
            merged = merge_and_unload(copy.deepcopy(module.net))
            print(f"LoRA merged into plain ResNet-18 convs: test accuracy {accuracy(merged, test):.3f} "
                  f"(adapted: {rows[-1].accuracy:.3f})")

    print(f"\nTarget task: digits 5-9, {len(train)} training images, {finetune_epochs} epochs, test on {len(test)}\n")
    print(f"| {'method':<28} | accuracy | trainable params | total params | saved MB | train s |")
    print(f"|{'-' * 30}|---------:|-----------------:|-------------:|---------:|--------:|")
    for r in rows:
        print(f"| {r.method:<28} | {r.accuracy:8.3f} | {r.trainable:>16,} | {r.total:>12,} | "
              f"{r.saved_bytes / 1e6:8.2f} | {r.seconds:7.1f} |")


if __name__ == "__main__":
    main()

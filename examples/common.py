"""Helpers shared by the examples: offline data sets, accuracy with torchmetrics, and the results table + plot.

Everything here ships with Python, scikit-learn or the installed packages: nothing is downloaded.

* :func:`digits_transfer`: scikit-learn's handwritten digits (1,797 8x8 images) as an honest transfer task. A
  backbone is pretrained on digits 0-4 (the *source*), then adapted to the unseen digits 5-9 from a few labels
  per class (the *target*), and tested on the other images of 5-9.
* :func:`docstring_topics`: a small real-text classification task. Each example is the first paragraph of a
  docstring of the Python standard library, labelled with the area of the module it comes from ("text" for
  ``re``/``string``/``textwrap``..., "math", "files", "time", "network"). The sentences are real English written
  by the CPython developers; the label is never a word of the input (module names are not in the text).
* :func:`write_results`: a markdown table and a PNG plot (accuracy against trainable parameters, per method).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import param_groups

RESULTS = Path(__file__).parent / "results"


def comparison_args(doc: str, quick_help: str) -> tuple[argparse.Namespace, Path]:
    """Parse ``--quick``, ``--seed`` and ``--out`` of a comparison example; returns the args and the results folder
    (``examples/results``, or a temporary folder for a quick run)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}; quick: a temp dir)")
    args = parser.parse_args()
    return args, args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)


def digits_transfer(
    size: int, labels_per_class: int = 40, seed: int = 0, channels: int = 3, quick: bool = False
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """``(source, target_train, target_test)`` from scikit-learn's digits, upsampled to ``size`` x ``size``.

    The source holds every image of digits 0-4 (labels 0-4); the target split holds digits 5-9 relabelled
    0-4, ``labels_per_class`` random images per class for training and all other images for testing.
    ``quick`` keeps the first 300 source and 200 test images (smoke runs).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    images = ((images - 0.3) / 0.4).repeat(1, channels, 1, 1)  # roughly zero mean, unit variance
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for digit in range(5, 10):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        train.append(idx[:labels_per_class])
        test.append(idx[labels_per_class:])
    source = labels < 5
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    source_set = TensorDataset(images[source], labels[source])
    test_set = TensorDataset(images[test_idx], labels[test_idx] - 5)
    if quick:
        source_set = TensorDataset(*(t[:300] for t in source_set.tensors))
        test_set = TensorDataset(*(t[:200] for t in test_set.tensors))
    return source_set, TensorDataset(images[train_idx], labels[train_idx] - 5), test_set


TOPICS: dict[str, list[str]] = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "html", "codecs"],
    "math": ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "filecmp", "fnmatch"],
    "time": ["time", "datetime", "calendar", "zoneinfo", "sched"],
    "network": ["socket", "ssl", "http.client", "urllib.request", "urllib.parse", "email.message", "smtplib"],
}


def docstring_topics(
    per_class: int = 100, train_per_class: int = 32, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """``(train, test, class names)``: docstring sentences of the standard library labelled by module area.

    At most ``per_class`` sentences per class are kept (the classes differ in size), ``train_per_class`` of them
    train; the rest test. Duplicated sentences and signature lines (``gmtime([seconds]) -> ...``) are dropped.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, modules in enumerate(TOPICS.values()):
        sentences = []
        for module_name in modules:
            for text in _docstrings(importlib.import_module(module_name)):
                if text not in seen:
                    seen.add(text)
                    sentences.append(text)
        rng.shuffle(sentences)
        chosen = sentences[:per_class]
        train += [(s, label) for s in chosen[:train_per_class]]
        test += [(s, label) for s in chosen[train_per_class:]]
    rng.shuffle(train)
    return train, test, list(TOPICS)


def _docstrings(module: object) -> list[str]:
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", module.__name__) != module.__name__:  # type: ignore[attr-defined]
            continue
        members = [obj]
        if inspect.isclass(obj):
            members += [v for k, v in vars(obj).items() if not k.startswith("_") and callable(v)]
        for member in members:
            doc = inspect.getdoc(member) if callable(member) else None
            text = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if len(text) >= 20 and "->" not in text and not re.match(r"^[\w.]+\(", text):
                found.append(text)
    return found


def accuracy(model: nn.Module, loader: DataLoader, num_classes: int) -> float:
    """Top-1 accuracy (torchmetrics ``MulticlassAccuracy``, micro average) of ``model(inputs)`` on ``loader``."""
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for inputs, labels in loader:
            metric.update(model(inputs), labels)
    model.train(was_training)
    return float(metric.compute())


@dataclass
class Result:
    """One row of a comparison: a method, its test accuracy, its parameter counts and its training time."""

    method: str
    accuracy: float
    trainable: int
    total: int
    seconds: float


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table (accuracy, trainable parameters and their share, training seconds)."""
    width = max(len("method"), *(len(r.method) for r in results))
    lines = [
        f"| {'method':<{width}} | accuracy | trainable params | trainable % | train s |",
        f"|{'-' * (width + 2)}|---------:|-----------------:|------------:|--------:|",
    ]
    for r in results:
        lines.append(f"| {r.method:<{width}} | {r.accuracy:8.3f} | {r.trainable:>16,} | "
                     f"{100 * r.trainable / r.total:11.3f} | {r.seconds:7.1f} |")
    return "\n".join(lines)


def evaluate(method: str, net: nn.Module, loader: DataLoader, num_classes: int, seconds: float) -> Result:
    """Test accuracy and parameter counts of one trained method, printed as one line."""
    from lightning_peft import trainable_summary

    counts = trainable_summary(net)
    result = Result(method, accuracy(net, loader, num_classes), counts.trainable, counts.total, seconds)
    print(f"{method:<28} accuracy {result.accuracy:.3f}  trainable {counts.trainable:,}  {seconds:.1f} s")
    return result


def report(name: str, title: str, results: list[Result], out_dir: Path) -> None:
    """Write the table and plot of a comparison example (see :func:`write_results`) and print the table."""
    table, plot = write_results(name, title, results, out_dir)
    print(f"\n{table.read_text()}\nwrote {table} and {plot}")


def write_results(name: str, title: str, results: list[Result], out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.md`` (title + table) and ``<name>.png`` (accuracy vs trainable parameters) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path, plot_path = out_dir / f"{name}.md", out_dir / f"{name}.png"
    table_path.write_text(f"{title}\n\n{markdown_table(results)}\n")
    plot_results(title, results, plot_path)
    return table_path, plot_path


def fit_classifier(
    net: nn.Module, train: TensorDataset, *, epochs: int, lr: float, seed: int = 0, batch_size: int = 32,
    callbacks: list | None = None, probe_head: str | None = None, max_steps: int = -1,
    loraplus_ratio: float | None = None,
) -> tuple[nn.Module, float]:
    """Train ``net`` with cross-entropy in a Lightning Trainer (CPU, AdamW, cosine schedule); returns (module, s).

    ``callbacks`` are lightning_peft method callbacks (``LoRA(...)``, ``PromptTuning(...)``) or none (full
    finetuning). ``probe_head`` names the head of a linear probe: everything else is frozen, BatchNorm included.
    ``loraplus_ratio``: the optimizer takes LoRA+ groups (:func:`lightning_peft.param_groups`).
    """
    quiet_lightning()
    L.seed_everything(seed, verbose=False)
    if probe_head is not None:
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith(f"{probe_head}."))
    module = LitClassifier(net, lr=lr, epochs=epochs, probe=probe_head is not None, loraplus_ratio=loraplus_ratio)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, max_steps=max_steps, callbacks=callbacks or [],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    return module, time.perf_counter() - start


def quiet_lightning() -> None:
    """Hide Lightning's per-Trainer banners (GPU/TPU availability, tips) so the examples' own lines stand out."""
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


class LitClassifier(L.LightningModule):
    """A LightningModule around any classifier ``net``: cross-entropy, AdamW on what trains, cosine schedule.

    With ``probe=True`` BatchNorm layers stay in eval mode (a frozen backbone keeps its statistics, as the
    lightning_peft callbacks do by default). With ``loraplus_ratio`` the optimizer gets LoRA+ parameter groups:
    LoRA's B factors at ``lr * loraplus_ratio``, the rest at ``lr`` (:func:`lightning_peft.param_groups`).
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, epochs: int = 1, probe: bool = False,
                 loraplus_ratio: float | None = None) -> None:
        super().__init__()
        self.net, self.lr, self.epochs, self.probe = net, lr, epochs, probe
        self.loraplus_ratio = loraplus_ratio

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def on_train_epoch_start(self) -> None:
        if self.probe:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        # the method callbacks have injected by now, so the groups see the adapters
        params = ([p for p in self.parameters() if p.requires_grad] if self.loraplus_ratio is None
                  else param_groups(self, self.lr, loraplus_ratio=self.loraplus_ratio))
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(self.epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def plot_results(title: str, results: list[Result], path: Path) -> None:
    """A PNG scatter of test accuracy against trainable parameters (log scale), one labelled point per method."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, r in enumerate(results):
        # label above the point, or below it when its nearest neighbour (in log parameters) is more accurate
        near = min((o for o in results if o is not r), key=lambda o: abs(math.log(o.trainable / r.trainable)), default=r)
        above = r.accuracy > near.accuracy or (r.accuracy == near.accuracy and i % 2 == 0)
        ax.scatter(r.trainable, r.accuracy, s=60)
        ax.annotate(r.method, (r.trainable, r.accuracy), textcoords="offset points", fontsize=8,
                    xytext=(0, 9 if above else -14), ha="center")
    ax.set_xscale("log")
    low, high = min(r.trainable for r in results), max(r.trainable for r in results)
    ax.set_xlim(low / 3, high * 3)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(alpha=0.3)
    accuracies = [r.accuracy for r in results]
    ax.set_ylim(max(0.0, min(accuracies) - 0.05), min(1.03, max(accuracies) + 0.04))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def results_from_markdown(path: Path) -> tuple[str, list[Result]]:
    """Read back ``(title, results)`` from a table written by :func:`write_results` (to redraw its plot)."""
    title, _, table = path.read_text().partition("\n\n")
    results = []
    for line in table.splitlines()[2:]:
        method, acc, trainable, percent, seconds = (c.strip() for c in line.strip("|").split("|"))
        count = int(trainable.replace(",", ""))
        results.append(Result(method, float(acc), count, round(count * 100 / float(percent)), float(seconds)))
    return title, results

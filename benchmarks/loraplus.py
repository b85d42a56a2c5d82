"""LoRA+ on a real task: ours (``param_groups``) against HF PEFT's ``create_loraplus_optimizer`` and plain LoRA.

Task: examples/text_minilm.py's (the real pretrained all-MiniLM-L6-v2 classifying stdlib docstrings into 5 areas,
32 training sentences per class). LoRA r=8, alpha 16 on ``query``/``value``, the classification head trained too,
AdamW (weight decay 0.01), batch 16, the same batches in the same order for every contender. Contenders:

- ``lora``: ours, one learning rate for every tensor (what LoRA+ improves on);
- ``lora+ ours``: ours with ``param_groups(model, lr, loraplus_ratio=16)`` (B at 16 x lr, biases at lr);
- ``lora+ peft``: PEFT's model holding the very same starting tensors (our adapter saved in PEFT's format and
  loaded by ``PeftModel.from_pretrained``), optimizer from ``create_loraplus_optimizer(..., loraplus_lr_ratio=16)``
  (PEFT puts 1-D tensors, the head's bias included, at 16 x lr as well).

Reported per contender and learning rate: training loss after each epoch, test accuracy at the end, ms per step
(median over the run). No timing is asserted anywhere: LoRA+ changes what is learned per step, not its cost.

    python benchmarks/loraplus.py            # about 6 minutes on 2 CPU threads
    python benchmarks/loraplus.py --smoke    # a few steps
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import docstring_topics  # noqa: E402
from text_minilm import SequenceClassifier, encode, load_classifier, minilm_path  # noqa: E402

from lightning_peft import LoRAConfig, inject, param_groups, save_adapter  # noqa: E402

CONTENDERS = ("lora", "lora+ ours", "lora+ peft")
RATIO, R, ALPHA, WEIGHT_DECAY = 16.0, 8, 16.0, 0.01


def adapted(base: nn.Module, contender: str) -> nn.Module:
    """``base`` (a copy) with LoRA from ours, or PEFT's model with the same starting tensors."""
    config = LoRAConfig(r=R, alpha=ALPHA, target_modules=["query", "value"], trainable_modules=["classifier"])
    ours = inject(copy.deepcopy(base), config)
    if contender != "lora+ peft":
        return ours
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        save_adapter(ours, folder, format="peft")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)


def optimizer_for(model: nn.Module, contender: str, lr: float) -> torch.optim.Optimizer:
    if contender == "lora":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=WEIGHT_DECAY)
    if contender == "lora+ ours":
        return torch.optim.AdamW(param_groups(model, lr, loraplus_ratio=RATIO), lr=lr, weight_decay=WEIGHT_DECAY)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=RATIO,
                                     weight_decay=WEIGHT_DECAY)


def run(base: nn.Module, contender: str, lr: float, train: DataLoader, test: DataLoader, epochs: int,
        max_steps: int | None) -> dict:
    torch.manual_seed(0)
    net = SequenceClassifier(adapted(base, contender)).train()
    optimizer = optimizer_for(net.model, contender, lr)
    losses, step_ms, steps = [], [], 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for inputs, labels in train:
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(net(inputs), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_ms.append((time.perf_counter() - start) * 1000)
            total, count, steps = total + loss.item() * len(labels), count + len(labels), steps + 1
            if max_steps is not None and steps >= max_steps:
                break
        losses.append(total / count)
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(-1) == y).sum()) for x, y in test)
    return {"contender": contender, "lr": lr, "epoch_loss": losses, "accuracy": correct / len(test.dataset),
            "step_ms": statistics.median(step_ms)}


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"Measured {info['date']} on {info['cpu']}, {info['threads']} threads, torch {info['torch']}, peft "
             f"{info.get('peft', '?')}; all-MiniLM-L6-v2 on stdlib docstring topics (5 classes), LoRA r={R} on "
             f"query/value + head, AdamW wd {WEIGHT_DECAY}, batch 16, {info['epochs']} epochs, LoRA+ ratio "
             f"{RATIO:g}.", "",
             "| lr | contender | train loss after epoch 1 / 3 / last | test accuracy | ms per step |",
             "|---|---|---|---|---|"]
    for row in rows:
        loss = row["epoch_loss"]
        picks = " / ".join(f"{loss[i]:.3f}" for i in sorted({0, min(2, len(loss) - 1), len(loss) - 1}))
        lines.append(f"| {row['lr']:g} | {row['contender']} | {picks} | {row['accuracy']:.3f} | "
                     f"{row['step_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 steps per contender, one learning rate")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lrs", nargs="*", type=float, default=[2e-4, 5e-4, 2e-3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from report import machine_info, write_results
    from transformers import AutoTokenizer

    train_pairs, test_pairs, classes = docstring_topics(per_class=100, train_per_class=32, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_set, test_set = encode(tokenizer, train_pairs), encode(tokenizer, test_pairs)
    train = DataLoader(train_set, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(test_set, batch_size=64)
    base = load_classifier(len(classes), seed=0)
    epochs, max_steps, lrs = (1, 2, args.lrs[:1]) if args.smoke else (args.epochs, None, args.lrs)
    rows = []
    for lr in lrs:
        for contender in CONTENDERS:
            train.generator.manual_seed(0)  # type: ignore[union-attr]  # the same batches, in the same order
            rows.append(run(base, contender, lr, train, test, epochs, max_steps))
            print(rows[-1], flush=True)
    info = {**machine_info("cpu", args.threads), "epochs": epochs}
    write_results(Path(args.out), info, rows, "loraplus-cpu" + ("-smoke" if args.smoke else ""), markdown)
    print(markdown(info, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the participation check costs: its one watched forward per mode, and every forward after it.

The same adapted model runs forwards with the check on (after its modes are checked) and off
(``participation_check(model, False)``), interleaved round by round (A B A B ...); each round is the median of
``--reps`` forwards, the table gives the median over rounds and its min-max, and the ratio on ÷ off. The first
forward of a mode (the watched one) is timed apart, against a forward with the check off.

    python benchmarks/guard_cost.py            # ResNet-18 and GPT-2, train and eval, ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_peft import LoRAConfig, inject, participation_check  # noqa: E402


def models() -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor, LoRAConfig]]:
    import torchvision
    import transformers

    def gpt2() -> nn.Module:
        config = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000, n_positions=128)
        return transformers.GPT2LMHeadModel(config)

    return {
        "ResNet-18 64px b8, LoRA all-conv": (lambda: torchvision.models.resnet18(num_classes=10),
                                             torch.randn(8, 3, 64, 64), LoRAConfig(r=8, target_modules="all-conv")),
        "GPT-2 4x256 b4x64, LoRA all-linear": (gpt2, torch.randint(0, 1000, (4, 64)),
                                               LoRAConfig(r=8, target_modules="all-linear")),
    }


def timed(model: nn.Module, inputs: torch.Tensor, train: bool) -> float:
    model.train(train)
    start = time.perf_counter()
    with torch.set_grad_enabled(train):
        out = model(inputs)
        if train:
            (out.logits if hasattr(out, "logits") else out).float().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "guard-cpu.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = ["| model | mode | first forward on ÷ off | later forwards on ÷ off, median [min-max] | ms per forward (off) |",
            "|---|---|---|---|---|"]
    for name, (build, inputs, config) in models().items():
        base = build()
        for train in (True, False):
            on, off = inject(copy.deepcopy(base), config), inject(copy.deepcopy(base), config)
            participation_check(off, False)
            timed(off, inputs, train)  # warm up the allocator and kernels outside the comparison
            first_off = timed(off, inputs, train)
            first_on = timed(on, inputs, train)  # the watched forward
            ratios, plain = [], []
            for _ in range(args.rounds):
                a = statistics.median(timed(on, inputs, train) for _ in range(args.reps))
                b = statistics.median(timed(off, inputs, train) for _ in range(args.reps))
                ratios.append(a / b)
                plain.append(b)
            mode = "train (fwd+bwd)" if train else "eval, no_grad"
            rows.append(f"| {name} | {mode} | {first_on / first_off:.2f} | {statistics.median(ratios):.3f} "
                        f"[{min(ratios):.3f}-{max(ratios):.3f}] | {1000 * statistics.median(plain):.1f} |")
            print(rows[-1], flush=True)
    header = (f"# Participation check cost (CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n")
    Path(args.out).write_text(header + "\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

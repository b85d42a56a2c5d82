"""Per-layer cost of LoRA on a 3x3 convolution: forward + backward of one layer, relative to the frozen conv.

Contenders, interleaved round by round on the same input: the frozen conv (forward + input gradient: the floor),
full training of the conv, HF PEFT's LoRA layer, and our three paths chosen with ``LoRA(conv_path=...)``: the plain
three-convolution path (``"adapter"``), the fused path (``"fused"``, :mod:`lightning_peft.lora.fused_conv`) and the
folded-weight path ``conv(x, W + s·BA)`` (``"folded"``).

    python benchmarks/conv_layers.py --threads 2 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_peft import LoRA, inject  # noqa: E402

SHAPES = [(64, 48), (128, 24), (256, 12)]


def _step_fn(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer(x).backward(grad)
        for p in layer.parameters():
            p.grad = None
        x.grad = None

    return step


def contenders(channels: int, size: int, batch: int, r: int, device: str) -> dict[str, Callable[[], None]]:
    """One training step of a single conv layer per contender (same weights, input and output gradient)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1)).to(device)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    grad = torch.randn(batch, channels, size, size, device=device)
    frozen = copy.deepcopy(base).requires_grad_(False)
    full = copy.deepcopy(base)
    ours = {path: inject(copy.deepcopy(base), LoRA(r=r, alpha=2 * r, target_modules=["0"], conv_path=path))
            for path in ("adapter", "fused", "folded")}
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    return {
        "frozen": _step_fn(frozen, x, grad),
        "full": _step_fn(full, x, grad),
        "peft": _step_fn(peft, x, grad),
        "ours_plain": _step_fn(ours["adapter"], x, grad),
        "ours_fused": _step_fn(ours["fused"], x, grad),
        "folded": _step_fn(ours["folded"], x, grad),
    }


def measure(fns: dict[str, Callable[[], None]], rounds: int, reps: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step, ``rounds`` interleaved rounds (ABAB...), each the median of ``reps`` steps."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples = []
            for _ in range(reps):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples))
    return times


def run(threads: int, batch: int, r: int, rounds: int, reps: int, device: str) -> list[dict[str, object]]:
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for channels, size in SHAPES:
        times = measure(contenders(channels, size, batch, r, device), rounds, reps, sync)
        floor = statistics.median(times["frozen"])
        ratios = {k: round(statistics.median(v) / floor, 3) for k, v in times.items()}
        spread = {k: [round(min(v) / floor, 3), round(max(v) / floor, 3)] for k, v in times.items()}
        rows.append({"shape": f"{channels}ch@{size}px", "frozen_ms": round(floor * 1e3, 3), "ratio_to_frozen": ratios,
                     "min_max": spread})
        print(f"{channels}ch@{size}px frozen {floor * 1e3:.2f} ms  " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()),
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = run(args.threads, args.batch, args.r, args.rounds, args.reps, args.device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "batch": args.batch, "r": args.r, "device": args.device, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()

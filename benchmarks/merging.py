"""Weighted adapter merging: ours (``add_weighted_adapter``) against HF PEFT's on the same weights, every type.

A GPT-2 (4 layers x 768, random weights) holds three named LoRA adapters (r=8 on ``c_attn``, ``c_proj``, ``c_fc``:
16 layers, random A and B), the same tensors in PEFT's model. For each of PEFT's 11 combination types, weights
``[0.6, 0.3, -0.2]`` (density 0.5 where one is needed): the time to add the merged adapter (ours and PEFT's
interleaved, median of the rounds) and how far ours is from PEFT's result, ``max |ΔW_ours - ΔW_PEFT| / max |ΔW_PEFT|``
over the layers (DARE's random masks: ours from ``seed``, PEFT's from the global generator, seeded the same way
right before it merges its first layer: ``peft_seeded_merges``, which tests/test_weighted_merging.py uses too).
For ``cat`` also the error against the written-out ``Σ w_i s_i B_i A_i``.

    python benchmarks/merging.py            # about 7 minutes on 2 CPU threads (the svd types dominate)
    python benchmarks/merging.py --smoke    # a tiny GPT-2, one round
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_peft import (  # noqa: E402
    LoRAConfig,
    adapters,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    set_adapter,
)

TARGETS = ["c_attn", "c_proj", "c_fc"]
SOURCES, R, WEIGHTS, DENSITY, SEED = ("u", "v", "w"), 8, [0.6, 0.3, -0.2], 0.5, 11
TYPES = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
         "magnitude_prune", "magnitude_prune_svd")


def build(smoke: bool) -> tuple[nn.Module, Any]:
    """Ours and PEFT's GPT-2 with the same three named adapters (random A and B)."""
    import peft
    import transformers

    torch.manual_seed(0)
    size = dict(n_embd=64, n_layer=2, n_head=2) if smoke else dict(n_embd=768, n_layer=4, n_head=12)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=1000, n_positions=128, **size)).eval()
    ours = copy.deepcopy(base)
    theirs: Any = None
    generator = torch.Generator().manual_seed(1)
    for i, name in enumerate(SOURCES):
        add_adapter(ours, name, LoRAConfig(r=R, alpha=2.0 * R + i, target_modules=TARGETS))
        config = peft.LoraConfig(r=R, lora_alpha=2.0 * R + i, target_modules=TARGETS, fan_in_fan_out=True)
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
        set_adapter(ours, name)
        modules = dict(theirs.base_model.model.named_modules())
        with torch.no_grad():
            for layer, adapter in adapters(ours):
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=generator) * 0.05)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.05)
                modules[layer].lora_A[name].weight.copy_(adapter.lora_A)
                modules[layer].lora_B[name].weight.copy_(adapter.lora_B)
    return ours, theirs


def deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    set_adapter(model, name)
    return {layer: adapter.delta_weight().detach() for layer, adapter in adapters(model)}


@contextlib.contextmanager
def peft_seeded_merges(seed: int) -> Iterator[list[int]]:
    """While open, PEFT's weighted merge seeds torch's global generator right before it merges its first layer
    (its DARE draws from that generator, after initialising the new adapter, which draws too), so its masks come
    from the stream ours draws from ``seed``; yields the seeds used (none: no layer merge ran, as for ``cat``).
    One merge per ``with``: the generator is seeded once."""
    from peft.tuners.lora.model import LoraModel

    seeded: list[int] = []
    originals = {name: getattr(LoraModel, name) for name in (
        "_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter")}

    def seeding(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not seeded:
                torch.manual_seed(seed)
                seeded.append(seed)
            return original(self, *args, **kwargs)

        return wrapped

    for name, original in originals.items():
        setattr(LoraModel, name, seeding(original))
    try:
        yield seeded
    finally:
        for name, original in originals.items():
            setattr(LoraModel, name, original)


def kwargs_for(how: str) -> dict[str, Any]:
    return {"density": DENSITY} if how.startswith(("ties", "dare", "magnitude")) else {}


def measure(ours: nn.Module, theirs: Any, how: str, rounds: int) -> dict:
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for index in range(rounds):
        for contender in ("ours", "peft") if index % 2 == 0 else ("peft", "ours"):
            name = f"{how}{index}"
            start = time.perf_counter()
            if contender == "ours":
                add_weighted_adapter(ours, list(SOURCES), WEIGHTS, name, combination_type=how, seed=SEED,
                                     **kwargs_for(how))  # type: ignore[arg-type]
            else:
                with peft_seeded_merges(SEED):
                    theirs.add_weighted_adapter(list(SOURCES), WEIGHTS, name, combination_type=how, **kwargs_for(how))
            times[contender].append((time.perf_counter() - start) * 1000)
    name = f"{how}0"
    ours_delta = deltas(ours, name)
    modules = dict(theirs.base_model.model.named_modules())
    worst = max((ours_delta[layer] - modules[layer].get_delta_weight(name)).abs().max().item()
                / modules[layer].get_delta_weight(name).abs().max().item() for layer in ours_delta)
    row = {"type": how, "ms": {k: statistics.median(v) for k, v in times.items()}, "relative_diff_vs_peft": worst}
    if how == "cat":
        sources = [deltas(ours, source) for source in SOURCES]
        written = {layer: sum(w * d[layer] for w, d in zip(WEIGHTS, sources, strict=True)) for layer in ours_delta}
        row["cat_error_vs_written_sum"] = max((ours_delta[k] - written[k]).abs().max().item() for k in written)
    for index in range(rounds):  # leave the model as it was for the next type
        set_adapter(ours, SOURCES[0])
        delete_adapter(ours, f"{how}{index}")
        theirs.delete_adapter(f"{how}{index}")
    return row


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"Measured {info['date']} on {info['cpu']}, {info['threads']} threads, torch {info['torch']}, peft "
             f"{info.get('peft', '?')}; GPT-2 {info['model']}, 3 adapters r={R} on {', '.join(TARGETS)}, weights "
             f"{WEIGHTS}, density {DENSITY}; median of {info['rounds']} interleaved rounds.", "",
             "| combination | ms ours / PEFT | ours÷PEFT | max relative difference from PEFT's ΔW |",
             "|---|---|---|---|"]
    for row in rows:
        ms = row["ms"]
        error = row.get("cat_error_vs_written_sum")
        extra = "" if error is None else f" (cat vs Σ wᵢΔWᵢ: {error:.1e})"
        lines.append(f"| {row['type']} | {ms['ours']:.0f} / {ms['peft']:.0f} | {ms['ours'] / ms['peft']:.2f} | "
                     f"{row['relative_diff_vs_peft']:.1e}{extra} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from report import machine_info, write_results

    rounds = 1 if args.smoke else args.rounds
    ours, theirs = build(args.smoke)
    rows = []
    for how in TYPES:
        rows.append(measure(ours, theirs, how, rounds))
        print(rows[-1], flush=True)
    info = {**machine_info("cpu", args.threads), "rounds": rounds, "model": "2 x 64" if args.smoke else "4 x 768"}
    write_results(Path(args.out), info, rows, "merging-cpu" + ("-smoke" if args.smoke else ""), markdown)
    print(markdown(info, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

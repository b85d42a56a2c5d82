"""Per-sample adapters: 8 named LoRA adapters in one eval batch, ours (``per_sample_adapters``) against HF PEFT's
``model(..., adapter_names=[...])`` on the same weights.

A GPT-2 (4 layers x 256, vocabulary 1000, random weights) gets 8 LoRA adapters (r=8, alpha 16, on ``c_attn``,
``c_proj``, ``c_fc``, random A and B) in both libraries, with the same tensors copied into PEFT's; a batch of
16 x 64 tokens gives each adapter two rows. The outputs are checked equal first (1e-4), then forwards run without
gradients, interleaved round by round (``measure.interleaved``), the base model without adapters beside them.

    python benchmarks/per_sample.py            # ~1 min on 2 CPU cores; writes results/per-sample-<device>.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import interleaved  # noqa: E402

from lightning_peft import LoRAConfig, add_adapter, per_sample_adapters  # noqa: E402
from lightning_peft.named import adapter_parts  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]


def build(adapters: int, r: int) -> tuple[nn.Module, nn.Module, nn.Module, list[str]]:
    """The base model, ours with ``adapters`` named adapters, and PEFT's with the same tensors."""
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000, n_positions=128,
                                     bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(config).eval()
    ours, theirs_base = copy.deepcopy(base), copy.deepcopy(base)
    names = [f"a{i}" for i in range(adapters)]
    generator = torch.Generator().manual_seed(1)
    for name in names:
        add_adapter(ours, name, LoRAConfig(r=r, alpha=2.0 * r, target_modules=TARGETS))
        with torch.no_grad():
            for _, layer in adapter_parts(ours, name)[0]:
                for param in (layer.lora_A, layer.lora_B):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, fan_in_fan_out=True)
    theirs = peft.get_peft_model(theirs_base, peft_config, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft_config)
    modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name in names:
            for layer_name, layer in adapter_parts(ours, name)[0]:
                module = modules[layer_name]
                module.lora_A[name].weight.copy_(layer.lora_A)
                module.lora_B[name].weight.copy_(layer.lora_B)
    return base, ours.eval(), theirs.eval(), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, ours, theirs, names = build(args.adapters, args.r)
    base, ours, theirs = base.to(args.device), ours.to(args.device), theirs.to(args.device)
    ids = torch.randint(0, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(2))
    ids = ids.to(args.device)
    rows: list[str | None] = [names[i % len(names)] for i in range(args.batch)]

    with torch.no_grad():
        with per_sample_adapters(ours, rows):
            mine = ours(ids).logits
        peft_out = theirs(input_ids=ids, adapter_names=rows).logits
        base_out = base(ids).logits
    error = (mine - peft_out).abs().max().item()
    assert error < 1e-4, f"ours and PEFT differ by {error:.3g}"
    assert (mine - base_out).abs().amax(dim=(1, 2)).min().item() > 1e-3, "an adapter changed nothing: weak check"

    def run_ours() -> None:
        with per_sample_adapters(ours, rows):
            ours(ids)

    with torch.no_grad():
        times = interleaved({"base (no adapters)": lambda: base(ids), "lightning_peft": run_ours,
                             "PEFT adapter_names": lambda: theirs(input_ids=ids, adapter_names=rows)},
                            args.rounds, args.reps, args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {platform.processor() or 'x86_64'}"
    lines = [
        f"Per-sample adapters, {args.adapters} adapters (r={args.r}) on GPT-2 4x256 (c_attn, c_proj, c_fc), batch "
        f"{args.batch} x {args.tokens}, eval, {device}, {args.threads} threads, {date.today()}; outputs equal PEFT's "
        f"to {error:.1e}. Median of {args.rounds} interleaved rounds (each the median of {args.reps} forwards).",
        "",
        "| contender | ms per batch (median, min-max) | rows/s | throughput ÷ PEFT |",
        "|---|---:|---:|---:|",
    ]
    peft_ms = times["PEFT adapter_names"]["median"]
    for name, stats in times.items():
        lines.append(f"| {name} | {stats['median']:.1f} ({stats['min']:.1f}-{stats['max']:.1f}) | "
                     f"{args.batch * 1e3 / stats['median']:.0f} | {peft_ms / stats['median']:.2f}x |")
    lines.append("")
    lines.append(f"Reproduce: `python benchmarks/per_sample.py --threads {args.threads}`")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"per-sample-{args.device}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

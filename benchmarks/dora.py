"""DoRA: lightning_peft's vs HF PEFT's, with our plain LoRA beside them (step time and saved activations).

Contenders, built from the same base weights and batch: ``ours`` (``LoRAConfig(dora=True)``), ``peft``
(``get_peft_model`` with ``use_dora=True`` on the very layers ours adapted, same r, alpha and dropout) and ``lora``
(ours without DoRA). Figures as in ``activations.py``: saved activations (``saved_activations``: bytes autograd keeps
for backward in one training forward, each storage once) and the step time (forward + backward + AdamW), the
contenders interleaved round by round (``measure.interleaved``), median [min-max] of the rounds.

    python benchmarks/dora.py            # GPT-2 4 x 768, batch 4 x 256, r=8 on every linear layer; a few minutes
    python benchmarks/dora.py --smoke    # tiny GPT-2, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations import adapted_names, saved_activations  # noqa: E402
from measure import Contender, interleaved, train_step  # noqa: E402
from models import activation_benches  # noqa: E402

R, ALPHA = 8, 16.0
CONTENDERS = ("ours", "peft", "lora")


def adapt(contender: str, model: nn.Module, targets: str | list[str], dropout: float, names: list[str]) -> nn.Module:
    """``model`` adapted in place: our DoRA, PEFT's DoRA (on ``names``, the layers ours adapts) or our plain LoRA."""
    if contender == "peft":
        from peft import LoraConfig, get_peft_model

        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=names,
                                                fan_in_fan_out=conv1d, use_dora=True))
    from lightning_peft import LoRAConfig, inject

    return inject(model, LoRAConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=targets,
                                    dora=contender == "ours"))


def markdown(info: dict, rows: list[dict]) -> str:
    def cells(row: dict, key: str, value: str, spec: str) -> str:
        return " / ".join(format(row[key][c][value], spec) for c in CONTENDERS)

    def ratio(row: dict, key: str, value: str, other: str) -> str:
        return f"{row[key]['ours'][value] / row[key][other][value]:.2f}"

    lines = [f"Measured {info['date']} on {info['cpu']}, {info['threads']} threads, torch {info['torch']}, peft "
             f"{info.get('peft', '?')}; r={R}, alpha={ALPHA:g} on every linear layer; step time the median of "
             f"{info['rounds']} interleaved rounds x {info['reps']} steps.", "",
             f"Reproduce: `{info['command']}`", "",
             "| model | dropout | step ms DoRA ours / PEFT / LoRA ours | DoRA ours÷PEFT | DoRA ours÷LoRA "
             "| saved MB DoRA ours / PEFT / LoRA ours | DoRA ours÷PEFT |", "|" + "---|" * 7]
    for row in rows:
        lines.append(f"| {row['model']} | {row['dropout']:g} | {cells(row, 'step_ms', 'median', '.0f')} "
                     f"| {ratio(row, 'step_ms', 'median', 'peft')} | {ratio(row, 'step_ms', 'median', 'lora')} "
                     f"| {cells(row, 'saved_mb', 'total', '.1f')} | {ratio(row, 'saved_mb', 'total', 'peft')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2, one round")
    parser.add_argument("--dropouts", nargs="*", type=float, default=[0.0, 0.1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rounds = 1 if args.smoke else args.rounds
    bench = activation_benches(tiny=args.smoke, seq=16 if args.smoke else 256)[0]  # GPT-2 (transformers Conv1D)
    base, batch = bench.build(), bench.batch("cpu")
    names = adapted_names(base, bench.all_layers)
    rows = []
    for dropout in args.dropouts:
        models = {c: adapt(c, copy.deepcopy(base), bench.all_layers, dropout, names) for c in CONTENDERS}
        row: dict = {"model": bench.name, "dropout": dropout, "adapted": len(names),
                     "saved_mb": {c: saved_activations(bench, m, batch) for c, m in models.items()}}
        steps = {c: train_step(bench, Contender(c, m), batch, "cpu") for c, m in models.items()}
        for step in steps.values():
            step()  # warm-up: optimizer state, allocator
        row["step_ms"] = interleaved(steps, rounds, args.reps, "cpu")
        rows.append(row)
        print(json.dumps(row), flush=True)
        del models, steps
    from report import machine_info, write_results

    info = machine_info("cpu", args.threads)
    info.update(rounds=rounds, reps=args.reps, command="python benchmarks/dora.py " + " ".join(sys.argv[1:]))
    name = "dora-cpu" + ("-smoke" if args.smoke else "")
    write_results(Path(args.out), info, rows, name, markdown)
    print(markdown(info, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Activation memory of LoRA, with its step time and peak RSS: lightning_peft vs HF PEFT vs full finetuning.

- **Saved activations** (exact, no timing noise): the bytes autograd keeps for backward during one training forward
  and the loss, counted with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, the model's own
  parameters and buffers left out (a cast copy of a weight counts: it is a new storage).
- **Step time**: forward + backward + AdamW, the contenders interleaved round by round (``measure.interleaved``),
  median [min-max] of the rounds.
- **Peak RSS** (rows with LoRA on every layer; ``--rss-all`` for all): one fresh process per contender and round
  (importing only its own library), the contenders' order rotating each round; the median of the rounds' peaks.

Contenders: ``ours``; ``before`` (ours with the adapter-input dropout it had before issue 28, ``nn.Dropout`` then A,
which keeps a dropped copy of the input per adapter; set per adapter, so it runs interleaved with ours); ``peft``
(``get_peft_model`` on the very layers ours adapted, same r, alpha and dropout); ``full`` (full finetuning).
Models: GPT-2 with 4 layers x 768 and a Llama with 4 layers x 512 and grouped-query attention (8/4 heads), batch
4 x 256 tokens, r=8 on every linear layer or on the attention projections only, dropout 0 and 0.1.

    python benchmarks/activations.py                  # about 20 minutes on 2 CPU threads
    python benchmarks/activations.py --smoke          # tiny models, seconds
    python benchmarks/activations.py --rss-only --suite quick   # peak RSS of run.py's quick rows (LoRA all layers)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import Contender, interleaved, train_step  # noqa: E402
from models import Batch, Bench, activation_benches, benches  # noqa: E402

R, ALPHA = 8, 16.0
CONTENDERS = ("ours", "before", "peft", "full")


def suite(name: str, smoke: bool) -> list[Bench]:
    """``"activations"``: the two models above; ``"quick"``: the models of ``run.py --quick``."""
    return activation_benches(tiny=smoke, seq=16 if smoke else 256) if name == "activations" else benches(
        "smoke" if smoke else "quick")


def saved_activations(bench: Bench, model: nn.Module, batch: Batch) -> dict[str, float]:
    """MiB autograd saves for backward in one training forward (see the module docstring), and the three largest
    kinds of saved storage as ``"dtype shape x count": MiB``."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[str, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = (f"{str(tensor.dtype)[6:]} {tuple(tensor.shape)}", storage.nbytes())
        return tensor

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = bench.loss(model, batch)
    del loss
    kinds: dict[str, list[int]] = {}
    for kind, nbytes in saved.values():
        kinds.setdefault(kind, []).append(nbytes)
    top = sorted(kinds.items(), key=lambda item: -sum(item[1]))[:3]
    return {"total": sum(n for _, n in saved.values()) / 2**20,
            **{f"{kind} x{len(sizes)}": sum(sizes) / 2**20 for kind, sizes in top}}


def as_before(model: nn.Module) -> nn.Module:
    """Ours with the adapter-input dropout of before issue 28 (``nn.Dropout``, then A), set on each adapter."""
    from lightning_peft.lora import LoRALayer

    def dropped_delta(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
        return layer.lora_delta(layer.dropout(x.to(layer.lora_A.dtype)) if x.is_floating_point() else x)

    for module in model.modules():
        if isinstance(module, LoRALayer):
            module.dropped_delta = types.MethodType(dropped_delta, module)  # type: ignore[method-assign]
    return model


def adapt(contender: str, model: nn.Module, targets: str | list[str], dropout: float,
          names: list[str] | None) -> nn.Module:
    """``model`` adapted in place by ``contender``; PEFT gets ``names`` (the layers ours adapts)."""
    if contender in ("ours", "before"):
        from lightning_peft import LoRAConfig, inject

        model = inject(model, LoRAConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=targets))
        return as_before(model) if contender == "before" else model
    if contender == "peft":
        from peft import LoraConfig, get_peft_model

        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=names,
                                                fan_in_fan_out=conv1d))
    return model.requires_grad_(True)


def adapted_names(base: nn.Module, targets: str | list[str]) -> list[str]:
    from lightning_peft import LoRAConfig, adapters, inject

    return [name for name, _ in adapters(inject(copy.deepcopy(base), LoRAConfig(r=R, target_modules=targets)))]


def child(spec: dict) -> None:
    """One contender in a fresh process: build, adapt, train ``steps`` steps; print the peak RSS (MiB) as JSON.

    The peak is ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss`` can carry the spawning parent's peak across exec).
    """
    torch.set_num_threads(spec["threads"])
    bench = next(b for b in suite(spec["suite"], spec["smoke"]) if b.name == spec["model"])
    model = adapt(spec["contender"], bench.build(), spec["targets"], spec["dropout"], spec["names"])
    step = train_step(bench, Contender(spec["contender"], model), bench.batch("cpu"), "cpu")
    for _ in range(spec["steps"]):
        step()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))


def peak_rss(spec: dict, contenders: tuple[str, ...], rounds: int) -> dict[str, dict[str, float]]:
    """Median [min-max] peak RSS per contender, one process each, the order rotating every round."""
    samples: dict[str, list[float]] = {c: [] for c in contenders}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for round_index in range(rounds):
        shift = round_index % len(contenders)
        for name in contenders[shift:] + contenders[:shift]:
            command = [sys.executable, __file__, "--child", json.dumps({**spec, "contender": name})]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            samples[name].append(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in samples.items()}


def measure_row(bench: Bench, base: nn.Module, targets: str | list[str], dropout: float,
                args: argparse.Namespace) -> dict:
    """Saved activations, step time and peak RSS of every contender for one (model, targets, dropout)."""
    names = adapted_names(base, targets)
    batch = bench.batch("cpu")
    row: dict = {"model": bench.name, "targets": targets if isinstance(targets, str) else "attention",
                 "dropout": dropout, "adapted": len(names)}
    contenders = tuple(c for c in CONTENDERS if dropout > 0 or c != "before")  # no dropout: before == ours
    if not args.rss_only:
        models = {c: adapt(c, copy.deepcopy(base), targets, dropout, names) for c in contenders}
        row["saved_mb"] = {c: saved_activations(bench, m, batch) for c, m in models.items()}
        steps = {c: train_step(bench, Contender(c, m), batch, "cpu") for c, m in models.items()}
        for step in steps.values():
            step()  # warm-up: optimizer state, allocator
        row["step_ms"] = interleaved(steps, args.rounds, args.reps, "cpu")
        del models, steps
    if args.rss_rounds and (row["targets"] == "all-linear" or args.rss_all):
        spec = {"suite": args.suite, "smoke": args.smoke, "model": bench.name, "targets": targets, "dropout": dropout,
                "names": names, "steps": args.rss_steps, "threads": args.threads}
        row["peak_rss_mb"] = peak_rss(spec, contenders, args.rss_rounds)
    return row


def markdown(info: dict, rows: list[dict]) -> str:
    def cells(row: dict, key: str, value: str = "median", spec: str = ".1f") -> str:
        figures = row.get(key, {})
        return " / ".join(format(figures[c][value], spec) if c in figures else "-" for c in CONTENDERS)

    def ratio(row: dict, key: str, value: str, other: str) -> str:
        figures = row.get(key, {})
        return f"{figures['ours'][value] / figures[other][value]:.2f}" if other in figures else "-"

    lines = [f"Measured {info['date']} on {info['cpu']}, {info['threads']} threads, torch {info['torch']}, peft "
             f"{info.get('peft', '?')}, transformers {info.get('transformers', '?')}; r={R}, alpha={ALPHA:g}, step "
             f"time the median of {info['rounds']} interleaved rounds x {info['reps']} steps, peak RSS the median of "
             f"{info['rss_rounds']} rounds of one process per contender ({info['rss_steps']} steps each).",
             "", f"Reproduce: `{info['command']}`", "",
             "| model | LoRA on | dropout | saved MB ours / before / PEFT / full | ours÷PEFT | ours÷full "
             "| step ms ours / before / PEFT / full | ours÷before | peak RSS MB ours / before / PEFT / full |",
             "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['targets']} | {row['dropout']:g} | {cells(row, 'saved_mb', 'total')} "
            f"| {ratio(row, 'saved_mb', 'total', 'peft')} | {ratio(row, 'saved_mb', 'total', 'full')} "
            f"| {cells(row, 'step_ms', spec='.0f')} | {ratio(row, 'step_ms', 'median', 'before')} "
            f"| {cells(row, 'peak_rss_mb', spec='.0f')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round (seconds)")
    parser.add_argument("--suite", default="activations", choices=["activations", "quick"],
                        help="activations: GPT-2 4x768 and Llama 4x512 GQA; quick: run.py's quick models")
    parser.add_argument("--models", nargs="*", default=None, help="only these models")
    parser.add_argument("--dropouts", nargs="*", type=float, default=[0.0, 0.1])
    parser.add_argument("--targets", nargs="*", default=["all", "attention"], choices=["all", "attention"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved step-time rounds")
    parser.add_argument("--reps", type=int, default=1, help="steps per round")
    parser.add_argument("--rss-rounds", type=int, default=3, help="processes per contender (0: no peak RSS)")
    parser.add_argument("--rss-steps", type=int, default=3)
    parser.add_argument("--rss-all", action="store_true", help="peak RSS of attention-only rows too")
    parser.add_argument("--rss-only", action="store_true", help="peak RSS only (no saved bytes, no step time)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.rss_rounds, args.rss_steps = 1, min(args.rss_rounds, 1), 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    from report import machine_info, write_results

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rows = []
    for bench in suite(args.suite, args.smoke):
        if args.models and bench.name not in args.models:
            continue
        base = bench.build()
        for kind in args.targets:
            targets = bench.all_layers if kind == "all" else bench.qv
            if targets is None:
                continue
            for dropout in args.dropouts:
                rows.append(measure_row(bench, base, targets, dropout, args))
                print(json.dumps(rows[-1]), flush=True)
    info = machine_info("cpu", args.threads)
    info.update(rounds=args.rounds, reps=args.reps, rss_rounds=args.rss_rounds, rss_steps=args.rss_steps,
                command="python benchmarks/activations.py " + " ".join(sys.argv[1:]))
    name = f"activations-{args.suite}" + ("-smoke" if args.smoke else "")
    write_results(Path(args.out), info, rows, name, markdown)
    print(markdown(info, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

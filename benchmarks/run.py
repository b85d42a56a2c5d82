"""lightning_peft vs HF PEFT vs full finetuning, measured in one run with the contenders interleaved.

For every model and method, the contenders are built from the same base weights and batch (same seed, same
thread count), then timed round by round in turn (A B C A B C ...): each round is the median of ``--reps``
steps, and the table gives the median over ``--rounds`` rounds and its min-max. Ratios (ours / PEFT, ours /
full finetuning) are the headline, since the machine's load shifts absolute times.

Figures: training step (forward + backward + AdamW step), peak training memory, trainable parameters, adapter
file size (``save_adapter`` vs PEFT's ``save_pretrained``), injection time, inference after merge relative to
the untouched base model and unmerged inference overhead.

    python benchmarks/run.py --quick           # a few minutes on 2 CPU cores
    python benchmarks/run.py --quick --smoke   # tiny models, seconds (the CI test)
    python benchmarks/run.py --device cuda     # bf16 autocast on a GPU

Peak memory: the contender's tensors alive before a step (weights, buffers, optimizer state) plus the highest
rise of allocated tensor memory during one step: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the
running total of ``torch.profiler``'s memory events (allocator-level, deterministic; not the process RSS).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import Contender, run_group  # noqa: E402
from models import benches  # noqa: E402
from methods import methods_for  # noqa: E402
from report import machine_info, write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches, three models (minutes on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, one round (seconds; for CI)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs under bf16 autocast")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 3; smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="steps per round (default 3; quick 2; smoke 1)")
    parser.add_argument("--models", nargs="*", default=None, help="only these models (names as in the table)")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods (lora-qv, lora-all, ...)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of ours and PEFT")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    mode = "smoke" if args.smoke else "cuda" if args.device == "cuda" else "quick" if args.quick else "full"
    rounds = args.rounds or {"smoke": 1, "quick": 3}.get(mode, 5)
    reps = args.reps or {"smoke": 1, "quick": 2}.get(mode, 3)
    rows = []
    for bench in benches(mode):
        if args.models and bench.name not in args.models:
            continue
        try:
            base = bench.build().to(args.device)
        except (ImportError, OSError) as err:  # e.g. the MiniLM package is not installed on this machine
            print(f"skipping {bench.name}: {type(err).__name__}: {err}", flush=True)
            continue
        batch = bench.batch(args.device)
        for method in methods_for(bench, mode):
            if args.methods and method.name not in args.methods:
                continue
            contenders: list[Contender] = method.contenders(base)
            row = run_group(bench, method.name, base, batch, contenders, rounds, reps, args.device, args.profile)
            rows.append(row)
            print(_summary(row), flush=True)
        del base
    info = machine_info(args.device, args.threads)
    info.update(mode=mode, rounds=rounds, reps=reps, command="python benchmarks/run.py " + " ".join(sys.argv[1:]))
    paths = write_results(Path(args.out), info, rows, name=f"{mode}-{args.device}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _summary(row: dict) -> str:
    step = row["step_ms"]
    parts = [f"{row['model']:<11} {row['method']:<9}"]
    parts += [f"{k} {v['median']:.1f}ms" for k, v in step.items() if "median" in v]
    parts += [f"ours/peft {row['ratios'].get('ours/peft', float('nan')):.2f}",
              f"ours/full {row['ratios'].get('ours/full', float('nan')):.2f}"]
    parts += [f"{k}: {v['error']}" for k, v in step.items() if "error" in v]
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

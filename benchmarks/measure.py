"""Timing, memory and size measurements, always interleaving the contenders of one group."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import Batch, Bench


@dataclass(eq=False)
class Contender:
    """One way to train a model: ours, PEFT's, or full finetuning."""

    name: str
    model: nn.Module | None
    inject_ms: float | None = None
    save: Callable[[Path], None] | None = None
    merged: Callable[[], nn.Module] | None = None  # a merged copy for inference (None: cannot merge)
    error: str | None = None
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


@contextlib.contextmanager
def _precision(device: str) -> Iterator[None]:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        yield


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, reps: int, device: str) -> dict[str, dict]:
    """Milliseconds per call of each function: ``rounds`` rounds A B C, B C A, C A B ..., each the median of ``reps``
    calls. The order rotates so that no contender always runs right after the same other one (a full finetuning
    step frees gigabytes that the next contender's step faults back in)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            times = []
            for _ in range(reps):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            samples[name].append(statistics.median(times))
    return {k: _stats(v) for k, v in samples.items()}


def train_step(bench: Bench, contender: Contender, batch: Batch, device: str) -> Callable[[], None]:
    """Forward, backward and an AdamW step of the contender's trainable parameters."""
    model = contender.model
    assert model is not None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    contender.optimizer = contender.optimizer or torch.optim.AdamW(params, lr=1e-5)
    optimizer = contender.optimizer

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _precision(device):
            loss = bench.loss(model, batch)
        loss.backward()
        optimizer.step()

    return step


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()
                                          if isinstance(v, torch.Tensor)]
    return _tensor_bytes(iter([*model.parameters(), *model.buffers(), *state]))


def peak_memory_mb(step: Callable[[], None], model: nn.Module, optimizer: torch.optim.Optimizer | None,
                   device: str) -> float:
    """Peak tensor memory of one training step, in MiB (see the module docstring of ``run.py``)."""
    before = _persistent_bytes(model, optimizer)
    if device == "cuda":  # other contenders share the GPU: count this one's tensors plus the step's rise
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (before + torch.cuda.max_memory_allocated() - allocated) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return (before + peak) / 2**20


def folder_kb(save: Callable[[Path], None]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1024


def profile_top(name: str, step: Callable[[], None], device: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"--- {name}: top ops by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def run_group(bench: Bench, method: str, base: nn.Module, batch: Batch, contenders: list[Contender],
              rounds: int, reps: int, device: str, profile: bool = False) -> dict:
    """Every figure of one (model, method) row; contenders that failed to build are reported with their error."""
    ok = [c for c in contenders if c.error is None and c.model is not None]
    row: dict = {"model": bench.name, "method": method, "step_ms": {c.name: {"error": c.error} for c in contenders
                                                                     if c not in ok}}
    steps = {c.name: train_step(bench, c, batch, device) for c in ok}
    for name, step in steps.items():  # warm-up: optimizer state, allocator, lazy kernels
        step()
    row["step_ms"].update(interleaved(steps, rounds, reps, device))
    ms = {k: v["median"] for k, v in row["step_ms"].items() if "median" in v}
    row["ratios"] = {f"ours/{k}": ms["ours"] / ms[k] for k in ("peft", "full") if "ours" in ms and k in ms}
    row["peak_mb"] = {c.name: peak_memory_mb(steps[c.name], c.model, c.optimizer, device) for c in ok}
    row["trainable"] = {c.name: sum(p.numel() for p in c.model.parameters() if p.requires_grad) for c in ok}
    row["file_kb"] = {c.name: folder_kb(c.save) for c in ok if c.save is not None}
    row["inject_ms"] = {c.name: c.inject_ms for c in ok if c.inject_ms is not None}
    row["inference"] = inference(bench, base, ok, batch, rounds, reps, device)
    if profile:
        for name in ("ours", "peft"):
            if name in steps:
                profile_top(f"{bench.name} {method} {name}", steps[name], device)
    for c in ok:
        c.optimizer = None
    return row


def inference(bench: Bench, base: nn.Module, contenders: list[Contender], batch: Batch, rounds: int, reps: int,
              device: str) -> dict:
    """Eval-mode forward time of each contender (unmerged and merged) relative to the untouched base model."""
    models = {"base": base}
    for c in contenders:
        if c.name == "full":
            continue
        models[f"{c.name}_unmerged"] = c.model
        if c.merged is not None:
            models[f"{c.name}_merged"] = c.merged()
    for m in models.values():
        m.eval()

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), _precision(device):
                bench.loss(model, batch)

        return run

    fns = {k: forward(m) for k, m in models.items()}
    for fn in fns.values():
        fn()
    times = interleaved(fns, rounds, reps, device)
    base_ms = times["base"]["median"]
    return {"base_ms": base_ms, **{k: v["median"] / base_ms for k, v in times.items() if k != "base"}}

"""Write benchmark results as JSON and a markdown table, with the machine and date they were measured on."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch


def machine_info(device: str, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "threads": threads, "device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import peft
        import transformers

        info.update(peft=peft.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(info: dict, rows: list[dict]) -> str:
    """The headline table: ratios first, then the absolute figures they come from."""
    head = (f"Measured {info['date']} on {info['cpu']}" + (f" + {info['gpu']}" if "gpu" in info else "")
            + f", {info['threads']} threads, device {info['device']}, torch {info['torch']}, "
            f"peft {info.get('peft', '?')}, mode {info['mode']} ({info['rounds']} interleaved rounds x "
            f"{info['reps']} steps; median [min-max]).\n\nReproduce: `{info['command']}`\n\n")
    lines = ["| model | method | step ms ours / PEFT / full | ours÷PEFT | ours÷full | peak MB ours / PEFT / full "
             "| trainable ours / PEFT | adapter KB ours / PEFT | inject ms ours / PEFT | merged infer ÷ base "
             "ours / PEFT | unmerged infer ÷ base ours / PEFT |",
             "|" + "---|" * 11]
    for row in rows:
        step = row["step_ms"]

        def cell(name: str) -> str:
            s = step.get(name, {})
            if "median" not in s:
                return "error" if name in step else "-"
            return f"{s['median']:.1f} [{s['min']:.0f}-{s['max']:.0f}]"

        def pair(d: dict, spec: str = ".1f", names: tuple[str, ...] = ("ours", "peft")) -> str:
            return " / ".join(_fmt(d.get(n), spec) for n in names)

        inf = row["inference"]
        lines.append(
            f"| {row['model']} | {row['method']} | {cell('ours')} / {cell('peft')} / {cell('full')} "
            f"| {_fmt(row['ratios'].get('ours/peft'))} | {_fmt(row['ratios'].get('ours/full'))} "
            f"| {pair(row['peak_mb'], '.0f', ('ours', 'peft', 'full'))} | {pair(row['trainable'], ',')} "
            f"| {pair(row['file_kb'])} | {pair(row['inject_ms'])} "
            f"| {_fmt(inf.get('ours_merged'))} / {_fmt(inf.get('peft_merged'))} "
            f"| {_fmt(inf.get('ours_unmerged'))} / {_fmt(inf.get('peft_unmerged'))} |"
        )
    errors = [f"- {r['model']} {r['method']} {k}: {v['error']}" for r in rows for k, v in r["step_ms"].items()
              if "error" in v]
    return head + "\n".join(lines) + ("\n\nContenders that failed:\n" + "\n".join(errors) if errors else "") + "\n"


def write_results(folder: Path, info: dict, rows: list[dict], name: str,
                  table: Callable[[dict, list[dict]], str] = markdown) -> list[Path]:
    """``<name>.json`` (everything) and ``<name>.md`` (``table``'s rendering) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    json_path.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    md_path.write_text(table(info, rows))
    return [json_path, md_path]

"""Every example runs end to end in its short mode (``--quick``) and reports what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
EXAMPLE = EXAMPLES / "resnet_digits_lora.py"
TABLE_ROW = re.compile(r"^\| ([^|]+?) +\| +([\d.]+) \| +([\d,]+) \| +([\d.]+) \| +([\d.]+) \|$", re.M)


def run_example(name: str, *args: str, timeout: int = 180) -> str:
    """Run ``examples/<name> --quick ...`` in a fresh interpreter (one thread); return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", *args], capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def results_table(text: str) -> dict[str, tuple[float, int]]:
    """``{method: (accuracy, trainable params)}`` from a results table (printed or written)."""
    return {m.group(1).strip(): (float(m.group(2)), int(m.group(3).replace(",", ""))) for m in TABLE_ROW.finditer(text)}


def test_resnet_digits_demo_quick_prints_a_table_with_consistent_counts() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {
        m.group(1).strip(): (float(m.group(2)), int(m.group(3).replace(",", "")), int(m.group(4).replace(",", "")))
        for m in re.finditer(r"^\| ([^|]+?) +\| +([\d.]+) \| +([\d,]+) \| +([\d,]+) \|", run.stdout, re.M)
    }
    assert set(rows) == {"LoRA r=8, all convs + head", "full finetuning", "linear probe"}, run.stdout
    resnet18_5_classes = 11_176_512 + 512 * 5 + 5  # torchvision ResNet-18 without its fc, plus a 5-class head
    assert rows["full finetuning"][1:] == (resnet18_5_classes, resnet18_5_classes)
    assert rows["linear probe"][1:] == (512 * 5 + 5, resnet18_5_classes)
    lora_trainable, lora_total = rows["LoRA r=8, all convs + head"][1:]
    assert lora_total - resnet18_5_classes == lora_trainable - (512 * 5 + 5) > 0  # adapters are the only new params
    assert all(0.0 <= acc <= 1.0 for acc, _, _ in rows.values())
    merged = re.search(r"test accuracy ([\d.]+) \(adapted: ([\d.]+)\)", run.stdout)
    assert merged is not None and merged.group(1) == merged.group(2)


@pytest.mark.parametrize(
    ("example", "methods"),
    [
        ("resnet_transfer.py", {"linear probe", "pixel prompt w=4 + head", "LoRA r=8 all convs + head",
                                "LoRA r=8 + pixel prompt", "full finetuning"}),
        ("vit_prompts_prefix.py", {"linear probe", "VPT-shallow p=8", "VPT-deep p=8", "prefix tuning p=8",
                                   "LoRA r=8 all-linear"}),
        ("text_minilm.py", {"linear probe", "prompt tuning p=10", "prefix tuning p=10", "LoRA r=8 query,value",
                            "LoRA+ r=8 query,value", "full finetuning"}),
    ],
)
def test_comparison_example_writes_a_table_and_a_plot_with_every_method(
    tmp_path: Path, example: str, methods: set[str]
) -> None:
    stdout = run_example(example, "--out", str(tmp_path))
    name = example.removesuffix(".py")
    written = results_table((tmp_path / f"{name}.md").read_text())
    assert set(written) == methods and written == results_table(stdout)
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert all(0.0 <= acc <= 1.0 for acc, _ in written.values())
    probe, full = written["linear probe"][1], max(trainable for _, trainable in written.values())
    # a probe trains the head only; every adapter method trains more than the probe (its adapters + the same head)
    assert all(probe < trainable for method, (_, trainable) in written.items() if method != "linear probe")
    if "full finetuning" in written:
        assert written["full finetuning"][1] == full
    if example == "resnet_transfer.py":  # LoRA merged into plain torchvision convs classifies exactly the same
        merged = re.search(r"merged into plain convs: accuracy ([\d.]+)", stdout)
        assert merged is not None and float(merged.group(1)) == written["LoRA r=8 all convs + head"][0]


def test_gpt_prefix_example_generates_with_the_prefix_and_counts_only_prefix_parameters() -> None:
    stdout = run_example("gpt_prefix_generate.py")
    counts = re.search(r"after prefix tuning \(([\d,]+) trainable", stdout)
    assert counts is not None and int(counts.group(1).replace(",", "")) == 2 * 2 * 4 * 64  # layers x (K, V) x p x width
    accuracy = re.search(r"pretrained model: ([\d.]+)\n +with the prefix: +([\d.]+)", stdout)
    assert accuracy is not None
    assert 0.0 <= float(accuracy.group(1)) <= 1.0 and float(accuracy.group(2)) > float(accuracy.group(1))
    generated = re.findall(r"^    ((?:\d ){10}\d)$", stdout, re.M)
    assert len(generated) == 6  # three samples before and three after prefix tuning


def test_merge_export_example_reloads_the_merged_model_without_lightning_peft(tmp_path: Path) -> None:
    stdout = run_example("merge_export.py", "--out", str(tmp_path))
    assert "lightning_peft modules left: none" in stdout
    assert re.search(r"reloaded BertForSequenceClassification without lightning_peft: max \|logit difference\| ", stdout)
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "adapter" / "adapter_config.json").exists()
    diffs = [float(d) for d in re.findall(r"max \|(?:diff|logit difference)\|(?: to the adapted model)? ([\d.e+-]+)", stdout)]
    assert len(diffs) == 3 and max(diffs) < 1e-4


@pytest.mark.slow
def test_multi_gpu_recipe_quick_path_trains_lora_under_ddp_spawn_on_two_cpu_processes() -> None:
    stdout = run_example("multi_gpu.py", timeout=240)
    assert "ranks agree: True" in stdout
    saved = re.search(r"checkpoint \S+\.ckpt: (\d+) tensors, ([\d,]+) numbers .* methods \['lora'\]", stdout)
    assert saved is not None
    injected = re.search(r"trainable params: ([\d,]+)", stdout)
    # the checkpoint holds exactly the trainable tensors (adapters + head), not the frozen backbone
    assert injected is not None and saved.group(2) == injected.group(1)


def test_cli_example_runs_fit_from_the_yaml_config_on_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "cli.py"), "fit", "--config", str(EXAMPLES / "configs" / "lora_cli.yaml"),
         "--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "lightning_peft: LoRA injected" in run.stdout + run.stderr
    assert (tmp_path / "config.yaml").exists()  # LightningCLI saved the resolved configuration, callbacks included
    assert "lightning_peft.LoRA" in (tmp_path / "config.yaml").read_text()

"""The benchmark script runs end to end (tiny models) and writes complete results; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_writes_json_and_markdown_with_every_figure(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--smoke", "--threads", "1",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((tmp_path / "smoke-cpu.json").read_text())
    assert {"date", "cpu", "threads", "torch", "command"} <= set(result["machine"])
    rows = {(r["model"], r["method"]): r for r in result["rows"]}
    assert ("resnet18", "lora-all") in rows and ("bert-tiny", "lora-qv") in rows and ("gpt2-tiny", "lora-qv") in rows
    for (model, method), row in rows.items():
        ok = [k for k, v in row["step_ms"].items() if "median" in v]
        assert "ours" in ok and "full" in ok, (model, method, row["step_ms"])
        assert row["step_ms"]["ours"]["min"] <= row["step_ms"]["ours"]["median"] <= row["step_ms"]["ours"]["max"]
        assert row["ratios"]["ours/full"] > 0 and row["peak_mb"]["ours"] > 0 and row["inject_ms"]["ours"] >= 0
        assert row["inference"]["base_ms"] > 0 and row["inference"]["ours_unmerged"] > 0
        assert row["trainable"]["ours"] < row["trainable"]["full"]
        assert row["file_kb"]["ours"] < row["file_kb"]["full"]  # adapter tensors and a config, not the model
        if method.startswith("lora"):
            assert "peft" in ok, row["step_ms"]  # a contender that failed must not skip the comparison
            assert row["trainable"]["ours"] == row["trainable"]["peft"]  # same layers, same rank
            assert row["inference"]["ours_merged"] > 0

    table = (tmp_path / "smoke-cpu.md").read_text()
    assert result["machine"]["date"] in table and "Reproduce: `python benchmarks/run.py" in table
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row


def test_vision_zoo_benchmark_holds_both_libraries_to_the_same_checks_on_one_model(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "zoo_vision.py"), "--only", "torchvision/resnet18",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "zoo-vision-partial.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| torchvision/resnet18 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours_lora, peft_lora, values, ours_prompt, peft_prompt, ours_prefix, peft_prefix = cells[1:]
    assert ours_lora == "OK" and peft_lora == "OK"  # plain convolutions: both pass every check
    mine, theirs = (int(v.replace(",", "")) for v in values.split(" / "))
    assert mine == theirs > 0  # the same modules at the same rank
    assert ours_prompt == "OK" and ours_prefix.startswith("refused (TargetNotFoundError: prefix tuning found no")
    assert "has no attribute 'config'" in peft_prompt and "has no attribute 'config'" in peft_prefix
    assert "lora: ours 1/1, PEFT 1/1; prompt: ours 1/1, PEFT 0/1; prefix: ours 0/1 (1 refused" in table


def test_peft_virtual_token_cells_pass_on_gpt2_and_compare_prompts_at_the_real_positions() -> None:
    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peft
        from peft_checks import _at_real_positions, peft_virtual_token_cell
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from zoo_checks import seeded
    from zoo_transformers_models import ZOO

    base = seeded(ZOO["gpt2"].build).eval()
    for config in (peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                   peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")):  # logits: 4 + 8 positions
        assert peft_virtual_token_cell(base, ZOO["gpt2"].inputs(), config, move=0.05) == "OK"
    adapted = {"logits": torch.arange(2 * 12 * 3.0).reshape(2, 12, 3), "pooled": torch.ones(2, 3)}
    reference = {"logits": torch.zeros(2, 8, 3), "pooled": torch.zeros(2, 3)}
    cut, flat = _at_real_positions(adapted, reference, virtual=4)
    assert torch.equal(cut, torch.cat([adapted["logits"][:, 4:].reshape(-1), torch.ones(6)])) and flat.numel() == 54
    with pytest.raises(AssertionError, match=r"output shapes differ: \(2, 12, 3\) vs \(2, 8, 3\)"):
        _at_real_positions(adapted, reference, virtual=3)  # not the virtual tokens' count: nothing is cut


def test_merging_benchmark_agrees_with_peft_on_gpt2_conv1d_for_every_deterministic_type() -> None:
    # benchmarks/merging.py --smoke's comparison, in process: GPT-2's Conv1D layers (fan_in_fan_out in PEFT), three
    # adapters; DARE's *_svd forms draw their masks over another layout than PEFT's (the same distribution, other
    # draws), so for those two the benchmark has only to run
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import merging
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ours, theirs = merging.build(smoke=True)
    for how in merging.TYPES:
        row = merging.measure(ours, theirs, how, rounds=1)
        if how not in ("dare_linear_svd", "dare_ties_svd"):
            assert row["relative_diff_vs_peft"] < 1e-5, row
    assert merging.measure(ours, theirs, "cat", rounds=1)["cat_error_vs_written_sum"] < 1e-6

"""Coverage of the transformers zoo by lightning_peft and by HF PEFT, on the same tiny models and batches.

For each family of ``tests/zoo_transformers_models.py`` and each method (LoRA r=4 on all linear layers, prefix
tuning with 4 tokens, the gated prefix, prompt tuning with 4 tokens):

* lightning_peft: the cell of ``tests/test_zoo_transformers.py`` (``zoo_checks.check_cell``: identity, gradients,
  merge, save/load); OK, or the error class and the first words of its message;
* HF PEFT LoRA on exactly the modules lightning_peft adapts, held to the same checks (``peft_checks.py``:
  identity, a gradient on every ``lora_`` tensor, outputs move, merge/unmerge exact, save/load exact);
* HF PEFT ``PrefixTuningConfig`` / ``PromptTuningConfig`` (4 virtual tokens, the task type of the model): the
  checks of ``peft_checks.peft_virtual_token_cell`` (disabled = base, a gradient on every trainable tensor,
  outputs at the real tokens move, reload exact).

Writes ``benchmarks/results/zoo-transformers.md``. Offline: models come from configs.
Run: ``python benchmarks/zoo_transformers.py``.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from peft_checks import peft_lora_cell, peft_virtual_token_cell, short  # noqa: E402
from test_zoo_transformers import REFUSED, base_model, method_for  # noqa: E402
from zoo_checks import check_cell  # noqa: E402
from zoo_transformers_models import ZOO  # noqa: E402

from lightning_peft import adapters, inject  # noqa: E402

METHODS = ("lora", "prefix", "gated", "prompt")
SEQ2SEQ, VISION = {"t5", "bart", "whisper"}, {"vit", "swin"}


def ours(family: str, method: str) -> tuple[str, int]:
    """The cell's verdict and its trainable adapter values."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            report = check_cell(base_model(family), method_for(family, method), ZOO[family].inputs(), Path(folder),
                                starts_as_identity=method in ("lora", "gated"), mergeable=method == "lora")
        except Exception as error:  # noqa: BLE001 - the table records every failure
            kind = "refused" if (family, method) in REFUSED else "FAIL"
            return f"{kind} ({short(error)})", 0
    return "OK", report.adapter_values


def peft_lora(family: str) -> tuple[str, int]:
    """PEFT LoRA on the modules our LoRA adapts in this family, through the same checks."""
    targets = [name for name, _ in adapters(inject(copy.deepcopy(base_model(family)), method_for(family, "lora")))]
    return peft_lora_cell(copy.deepcopy(base_model(family)), ZOO[family].inputs(), targets, move=0.05)


def peft_config(family: str, method: str) -> Any:
    import peft

    task = ("SEQ_2_SEQ_LM" if family in SEQ2SEQ else "FEATURE_EXTRACTION" if family in VISION | {"clip"}
            or family in {"bert", "roberta", "distilbert", "electra", "deberta-v2"} else "CAUSAL_LM")
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=4, task_type=task)
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=4, task_type=task)
    return None  # PEFT has no gated prefix (adaption prompts exist for Llama-like models only)


def theirs(family: str, method: str) -> str:
    """PEFT prefix or prompt tuning on the same model and batch, through ``peft_checks.peft_virtual_token_cell``."""
    config = peft_config(family, method)
    if config is None:
        return "n/a"
    return peft_virtual_token_cell(copy.deepcopy(base_model(family)), ZOO[family].inputs(), config, move=0.05)


def main() -> None:
    warnings.filterwarnings("ignore")
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    lines = [
        "# Transformers zoo: lightning_peft vs HF PEFT", "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}. "
        "lightning_peft cells pass every check of `tests/zoo_checks.py`. PEFT LoRA adapts exactly the modules ours "
        "adapts and is held to the same checks (identity, a gradient on every LoRA tensor, outputs move, "
        "merge/unmerge exact, save/load exact; the first failed check is shown). PEFT prefix/prompt: disabled = base, "
        "a gradient on every trainable tensor, outputs at the real tokens move, reload exact. "
        "Reproduce: `python benchmarks/zoo_transformers.py`.", "",
        "| family | lora (ours) | lora (PEFT) | LoRA values ours / PEFT | "
        + " | ".join(f"{m} (ours) | {m} (PEFT)" for m in METHODS[1:]) + " |",
        "|---" * (2 + 2 * len(METHODS)) + "|",
    ]
    ok = {"ours": dict.fromkeys(METHODS, 0), "peft": dict.fromkeys(METHODS, 0)}
    refused = dict.fromkeys(METHODS, 0)  # ours, where the method does not apply (REFUSED in the test)
    for family in ZOO:
        (mine, mine_values), (their_lora, their_values) = ours(family, "lora"), peft_lora(family)
        others = {m: (ours(family, m)[0], theirs(family, m)) for m in METHODS[1:]}
        verdicts = {"lora": (mine, their_lora), **others}
        for method, (a, b) in verdicts.items():
            ok["ours"][method] += a == "OK"
            refused[method] += a.startswith("refused")
            ok["peft"][method] += b == "OK"
        pairs = [cell for pair in others.values() for cell in pair]
        cells = [mine, their_lora, f"{mine_values:,} / {their_values:,}", *pairs]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    summary = "; ".join(
        f"{m}: ours {ok['ours'][m]}/{len(ZOO)}" + (f" ({refused[m]} refused: does not apply)" if refused[m] else "")
        + f", PEFT {ok['peft'][m]}/{len(ZOO)}" for m in METHODS)
    lines[4:4] = [f"Cells OK: {summary} (gated: PEFT has no gated prefix).", ""]
    out = ROOT / "benchmarks" / "results" / "zoo-transformers.md"
    out.write_text("\n".join(lines) + "\n")
    print(summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Coverage of the vision zoo by lightning_peft and by HF PEFT, on the same models, weights and batches.

For each model of ``tests/zoo_vision_models.py`` (21 torchvision families, ~40 timm architectures):

* lightning_peft, each method (LoRA r=4 on every convolution and non-head linear layer, a 4-pixel prompt border
  or 4 patch prompts, prefix tuning with 4 tokens): the cell of ``tests/test_zoo_vision.py``
  (``zoo_checks.check_cell``: identity, gradients on exactly the adapters, merge, save/load); OK, or the error;
* HF PEFT LoRA on exactly the same modules (``LoraConfig(r=4, target_modules=<their names>)``), held to the same
  checks: identity at init, every ``lora_`` tensor gets a non-zero gradient once the adapters moved, outputs
  move, ``merge_adapter``/``unmerge_adapter`` exact, ``save_pretrained`` then ``PeftModel.from_pretrained``
  exact. The first check that fails is recorded;
* HF PEFT prompt and prefix tuning (``PromptTuningConfig``/``PrefixTuningConfig``, 4 virtual tokens): the
  checks of ``peft_checks.peft_virtual_token_cell`` (disabled = base, gradients, outputs move, reload exact).

Writes ``benchmarks/results/zoo-vision.md``. Offline: random weights. Takes ~5 minutes on 2 CPU cores.
Run: ``python benchmarks/zoo_vision.py`` (``--only resnet`` keeps the models whose name contains ``resnet``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from peft_checks import peft_lora_cell, peft_virtual_token_cell, short  # noqa: E402
from test_zoo_vision import TOLERANCE, ZOO, base_model, lora_target_names, method_for  # noqa: E402
from zoo_checks import check_cell, nondegenerate  # noqa: E402

METHODS = ("lora", "prompt", "prefix")


def ours(name: str, method: str) -> tuple[str, int]:
    """The cell's verdict and its number of trainable adapter values."""
    model, base = ZOO[name], base_model(name)
    with tempfile.TemporaryDirectory() as folder:
        try:
            pixels = method == "prompt" and model.prompt_kind == "pixels"
            report = check_cell(base, method_for(name, method, base), model.inputs(), Path(folder),
                                starts_as_identity=method == "lora" or pixels, mergeable=method == "lora",
                                tol=TOLERANCE.get((name, method), 1e-5),
                                move=model.move)
        except Exception as error:  # noqa: BLE001 - the table records every failure
            kind = "refused" if method == "prefix" and model.prefix != "ok" else "FAIL"
            return f"{kind} ({short(error, 9)})", 0
    return "OK", report.adapter_values


def peft_lora(name: str) -> tuple[str, int]:
    """PEFT LoRA on the modules lightning_peft adapts, through the checks of ``zoo_checks.check_cell``."""
    base = nondegenerate(copy.deepcopy(base_model(name)))
    return peft_lora_cell(base, ZOO[name].inputs(), lora_target_names(base), move=ZOO[name].move)


def peft_virtual_tokens(name: str, method: str) -> str:
    """PEFT prompt or prefix tuning on the same model and batch, through ``peft_checks.peft_virtual_token_cell``."""
    import peft

    config_class = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
    # a task type, so that PEFT gets past choosing its model class and reports what it needs of the model
    config = config_class(num_virtual_tokens=4, task_type="FEATURE_EXTRACTION")
    return peft_virtual_token_cell(copy.deepcopy(base_model(name)), ZOO[name].inputs(), config, move=ZOO[name].move)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="keep the models whose name contains this")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder of the table (zoo-vision.md; zoo-vision-partial.md with --only)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import peft
    import timm
    import torchvision

    names = [name for name in ZOO if args.only in name]
    rows, totals = [], {"ours": dict.fromkeys(METHODS, 0), "peft": dict.fromkeys(METHODS, 0)}
    refused = dict.fromkeys(METHODS, 0)  # ours, where the method does not apply (prefix without token attention)
    for name in names:
        cells = {m: ours(name, m) for m in METHODS}
        theirs_lora = peft_lora(name)
        theirs = {"lora": theirs_lora[0], **{m: peft_virtual_tokens(name, m) for m in ("prompt", "prefix")}}
        for method in METHODS:
            totals["ours"][method] += cells[method][0] == "OK"
            refused[method] += cells[method][0].startswith("refused")
            totals["peft"][method] += theirs[method] == "OK"
        params = f"{cells['lora'][1]:,} / {theirs_lora[1]:,}"
        rows.append(f"| {name} | {cells['lora'][0]} | {theirs['lora']} | {params} | {cells['prompt'][0]} | "
                    f"{theirs['prompt']} | {cells['prefix'][0]} | {theirs['prefix']} |")
        print(rows[-1], flush=True)
    summary = "; ".join(
        f"{m}: ours {totals['ours'][m]}/{len(names)}"
        + (f" ({refused[m]} refused: the method does not apply)" if refused[m] else "")
        + f", PEFT {totals['peft'][m]}/{len(names)}" for m in METHODS)
    lines = [
        "# Vision zoo: lightning_peft vs HF PEFT", "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"peft {peft.__version__}; random weights, float64, BatchNorm calibrated on the batch "
        "(`tests/zoo_vision_models.py`). Both LoRAs adapt the same modules (every convolution and non-head linear "
        "layer, r=4) and are held to the same checks (identity, a gradient on every LoRA tensor, outputs move, "
        "merge/unmerge exact, save/load exact; tolerance 1e-5 relative); the first failed check is shown. PEFT "
        "prompt/prefix: disabled = base, a gradient on every trainable tensor, outputs move, reload exact. Reproduce: "
        "`python benchmarks/zoo_vision.py`.", "",
        f"Cells fully OK: {summary}.", "",
        "| model | LoRA (ours) | LoRA (PEFT) | LoRA values ours / PEFT | prompt (ours) | prompt (PEFT) | "
        "prefix (ours) | prefix (PEFT) |",
        "|---" * 8 + "|",
        *rows,
    ]
    out = args.out / ("zoo-vision.md" if not args.only else "zoo-vision-partial.md")
    out.write_text("\n".join(lines) + "\n")
    print(summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

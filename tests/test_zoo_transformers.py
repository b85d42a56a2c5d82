"""Model-zoo sweep over transformers architectures: every family x LoRA / prefix / gated prefix / prompt passes
the checks of :func:`zoo_checks.check_cell` (identity at init or when disabled, gradients on exactly the adapters,
outputs move, merge exact, save/load exact), or is refused with the error asserted here."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from torch import nn
from zoo_checks import check_cell, seeded
from zoo_transformers_models import ZOO

from lightning_peft import LoRAConfig, PrefixTuningConfig, PromptTuningConfig, inject
from lightning_peft.errors import TargetNotFoundError
from lightning_peft.methods import Method

pytest.importorskip("transformers")

NO_ATTENTION = r"prefix tuning found no attention layer in {model}"
#: (family, method) -> the refusal it must raise. Mamba has no attention at all; Whisper's encoder takes audio
#: features, so a token prompt has no encoder tokens to precede.
REFUSED = {
    **{("mamba", m): NO_ATTENTION.format(model="MambaForCausalLM") for m in ("prefix", "gated")},
    ("whisper", "prompt"): r"WhisperForConditionalGeneration's encoder takes no tokens",
}
#: Per-family LoRA targets (default "all-linear"). Mamba's mixer reads ``dt_proj.weight`` directly; its adapter
#: answers ``.weight`` with ``W + s·BA`` (lightning_peft.lora.readers), so the default, dt_proj included, applies.
LORA_TARGETS: dict[str, list[str]] = {}
#: Swin and CLIP's vision tower take pixel prompts; the default 30-pixel border would cover a 32x32 test image.
PIXEL_WIDTH = {"swin": 4, "clip": 4}


def method_for(family: str, method: str) -> Method:
    if method == "lora":
        return LoRAConfig(r=4, **({"target_modules": LORA_TARGETS[family]} if family in LORA_TARGETS else {}))
    if method in ("prefix", "gated"):
        return PrefixTuningConfig(num_tokens=4, gate=method == "gated")
    return PromptTuningConfig(num_tokens=4, **({"width": PIXEL_WIDTH[family]} if family in PIXEL_WIDTH else {}))


@functools.cache
def base_model(family: str) -> nn.Module:
    return seeded(ZOO[family].build).eval()  # check_cell works on copies: one build per family


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prefix", "gated", "prompt"])
@pytest.mark.parametrize("family", list(ZOO))
def test_zoo_cell(family: str, method: str, tmp_path: Path) -> None:
    base = base_model(family)
    config = method_for(family, method)
    if (family, method) in REFUSED:
        with pytest.raises(TargetNotFoundError, match=REFUSED[family, method]):
            inject(base, config)
        return
    report = check_cell(base, config, ZOO[family].inputs(), tmp_path,
                        starts_as_identity=method in ("lora", "gated"), mergeable=method == "lora")
    assert report.moved > 1e-3 and report.reloaded == 0.0


def test_refusal_table_names_sweep_families_and_refuses_prefix_on_every_attention_free_one() -> None:
    assert {family for family, _ in REFUSED} <= set(ZOO)
    assert all((family, "prefix") in REFUSED for family, model in ZOO.items() if not model.has_attention)

"""Model-zoo sweep over vision models: every torchvision classification family and ~40 timm architectures x
LoRA / prompt / prefix pass the checks of :func:`zoo_checks.check_cell` (identity at init, gradients on exactly
the adapters and on all of them, outputs move, merge exact, save/load exact), or prefix tuning is refused with
the error asserted here; and LoRA injects into every torchvision classification model on the meta device."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo_checks import check_cell, seeded
from zoo_vision_models import CALIBRATION, TIMM, TORCHVISION, VisionModel, calibrated

from lightning_peft import LoRAConfig, PrefixTuningConfig, PromptTuningConfig, inject
from lightning_peft.errors import TargetNotFoundError
from lightning_peft.methods import Method
from lightning_peft.prompt.config import detect_kind
from lightning_peft.targets import matches
from lightning_peft.tensors import adapter_tensors

pytest.importorskip("timm")
pytest.importorskip("torchvision")

ZOO: dict[str, VisionModel] = {
    **{f"torchvision/{name}": model for name, model in TORCHVISION.items()},
    **{f"timm/{name}": model for name, model in TIMM.items()},
}
#: MobileViT's attention output passes a fusion convolution: the seeded adapter move changes its logits by ~1e-4;
#: EfficientFormer's one attention layer sits behind a LayerScale of 1e-5 (timm's init): ~2e-6
TOLERANCE = {("timm/mobilevit_xxs", "prefix"): 1e-6, ("timm/efficientformer_l1", "prefix"): 1e-8}


@functools.cache
def base_model(name: str) -> nn.Module:
    model = ZOO[name]
    # check_cell works on copies: one build per model
    return calibrated(seeded(model.build), model.inputs(CALIBRATION, seed=5))


def lora_targets(model: nn.Module) -> list[str]:
    """The shortcuts that select something in ``model``: convolutions, and linear layers other than the head."""
    return [rule for rule in ("all-conv", "all-linear") if any(matches(rule, n, m) for n, m in model.named_modules())]


def lora_target_names(model: nn.Module) -> set[str]:
    """The modules :func:`lora_targets` selects; a MultiheadAttention's ``out_proj`` is adapted through its parent
    (lora/attention.py), so the parent is named instead."""
    targets = lora_targets(model)
    return {(n.rpartition(".")[0] if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.MultiheadAttention)
             else n) for n, m in model.named_modules() if n and any(matches(rule, n, m) for rule in targets)}


def method_for(name: str, method: str, base: nn.Module) -> Method:
    if method == "lora":
        return LoRAConfig(r=4, target_modules=lora_targets(base))
    if method == "prefix":
        return PrefixTuningConfig(num_tokens=4)
    return PromptTuningConfig(num_tokens=4, width=4)  # a 4-pixel border on the 32x32 images


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
@pytest.mark.parametrize("name", list(ZOO))
def test_vision_zoo_cell(name: str, method: str, tmp_path: Path) -> None:
    model, base = ZOO[name], base_model(name)
    config = method_for(name, method, base)
    if method == "prefix" and model.prefix != "ok":
        refusal = {
            "no attention": rf"prefix tuning found no attention layer in {type(base).__name__}",
            "not defined": rf"prefix tuning is not defined for {type(base).__name__}: .* over channels, not tokens",
            "gap": rf"prefix tuning has no handler for the attention layers of {type(base).__name__}",
        }[model.prefix]
        with pytest.raises(TargetNotFoundError, match=refusal):
            inject(base, config)
        return
    if method == "prompt":
        assert detect_kind(base) == model.prompt_kind
    pixels = method == "prompt" and model.prompt_kind == "pixels"  # a zero border: the identity at init
    check_cell(base, config, model.inputs(), tmp_path, starts_as_identity=method == "lora" or pixels,
               mergeable=method == "lora", tol=TOLERANCE.get((name, method), 1e-5),
               move=model.move)


@pytest.mark.slow
def test_lora_injects_into_every_torchvision_classification_model_on_the_meta_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every variant, the largest included: each conv and each non-head linear layer gets an adapter, none fails,
    # and the adapters are a small fraction of the model
    from torchvision import models

    names = models.list_models(module=models)
    assert len(names) >= 80
    # RegNets compute their stage widths with tensors before building: on the CPU, so the model builds on meta
    from_init = models.regnet.BlockParams.from_init_params.__func__

    def widths_on_cpu(cls: type, *args: object, **kwargs: object) -> object:
        with torch.device("cpu"):
            return from_init(cls, *args, **kwargs)

    monkeypatch.setattr(models.regnet.BlockParams, "from_init_params", classmethod(widths_on_cpu))
    for name in names:
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        with torch.device("meta"):
            base = models.get_model(name, weights=None, **kwargs)
        targets = lora_targets(base)
        expected = lora_target_names(base)
        size = sum(p.numel() for p in base.parameters())
        model = inject(base, LoRAConfig(r=8, target_modules=targets))
        tensors = [n for n, _ in adapter_tensors(model, include_buffers=False)]
        missing = sorted(e for e in expected if not any(t.startswith(e + ".") for t in tensors))
        assert not missing, f"{name}: not adapted {missing[:3]}"
        added = sum(t.numel() for _, t in adapter_tensors(model, include_buffers=False))
        assert 0 < added < 0.2 * size, f"{name}: {added} adapter values on a {size}-value model"


def test_sweep_covers_every_torchvision_family_and_forty_timm_architectures() -> None:
    from torchvision import models

    def family(name: str) -> str:
        return re.match(r"[a-z]+", name).group()  # type: ignore[union-attr]

    families = {family(name) for name in models.list_models(module=models)}
    # maxvit_t itself needs 224x224 inputs (the sweep builds MaxVit smaller); LoRA on it runs on the meta device
    assert families - {family(name) for name in TORCHVISION} == set()
    assert len(TIMM) >= 40

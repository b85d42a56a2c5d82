"""The benchmark rows: a method (LoRA q,v / all layers, prefix, prompt) and how each contender is built for it.

To add a row, append a :class:`Method` whose ``ours`` and ``peft`` functions adapt a copy of the base model in
place (and return it); the PEFT side is built with the same hyper-parameters and, for LoRA, the very layers
our selection adapted.
"""

from __future__ import annotations

import copy
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

import lightning_peft
from lightning_peft import LoRAConfig, adapters, inject, merge, save_adapter
from measure import Contender
from models import Bench

R, ALPHA, VIRTUAL_TOKENS = 8, 16.0, 10


@dataclass
class Method:
    """One row: ``ours(model)`` and ``peft(model, ours_model)`` adapt a fresh copy of the base in place."""

    name: str
    ours: Callable[[nn.Module], nn.Module]
    peft: Callable[[nn.Module, nn.Module], nn.Module]
    mergeable: bool
    repeats: int = 3

    def contenders(self, base: nn.Module) -> list[Contender]:
        """Ours, PEFT and full finetuning, injection timed in turn (ours, PEFT, ours, PEFT, ...)."""
        ours, peft = Contender("ours", None), Contender("peft", None)
        ours_times, peft_times = [], []
        for _ in range(self.repeats):
            ours.model = _timed(self.ours, copy.deepcopy(base), ours_times, ours)
            if ours.model is not None:
                peft.model = _timed(lambda m: self.peft(m, ours.model), copy.deepcopy(base), peft_times, peft)
        for contender, times in ((ours, ours_times), (peft, peft_times)):
            contender.inject_ms = statistics.median(times) if times else None
        if ours.model is not None:
            ours.save = lambda path, m=ours.model: save_adapter(m, path)
            ours.merged = (lambda m=ours.model: merge(copy.deepcopy(m))) if self.mergeable else None
        if peft.model is not None:
            peft.save = lambda path, m=peft.model: m.save_pretrained(str(path))
            peft.merged = (lambda m=peft.model: _peft_merged(m)) if self.mergeable else None
        full = Contender("full", copy.deepcopy(base).requires_grad_(True))
        full.save = lambda path, m=full.model: _save_full(m, path)
        return [ours, peft, full]


def _timed(fn: Callable[[nn.Module], nn.Module], model: nn.Module, times: list[float],
           contender: Contender) -> nn.Module | None:
    try:
        start = time.perf_counter()
        out = fn(model)
        times.append((time.perf_counter() - start) * 1e3)
        return out
    except Exception as err:  # a contender that cannot do this model is reported, not fatal
        contender.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        traceback.print_exc(limit=2)
        return None


def _peft_merged(model: nn.Module) -> nn.Module:
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    return merged


def _save_full(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path / "model.safetensors"))


def _lora(targets: str | list[str]) -> Method:
    def ours(model: nn.Module) -> nn.Module:
        return inject(model, LoRAConfig(r=R, alpha=ALPHA, target_modules=targets))

    def peft(model: nn.Module, ours_model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        names = [name for name, _ in adapters(ours_model)]  # exactly the layers ours adapted
        conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
        return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=names, fan_in_fan_out=conv1d))

    return Method("lora-qv" if isinstance(targets, list) else "lora-all", ours, peft, mergeable=True)


def _virtual_tokens(name: str, ours_config: str, peft_config: str) -> Method:
    """Prefix or prompt tuning with ``VIRTUAL_TOKENS`` virtual tokens, ours and PEFT's (causal LMs)."""

    def ours(model: nn.Module) -> nn.Module:
        return inject(model, getattr(lightning_peft, ours_config)(num_tokens=VIRTUAL_TOKENS))

    def peft(model: nn.Module, ours_model: nn.Module) -> nn.Module:
        import peft as hf_peft

        config = getattr(hf_peft, peft_config)(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
        return hf_peft.get_peft_model(model, config)

    return Method(name, ours, peft, mergeable=False)


def methods_for(bench: Bench, mode: str) -> list[Method]:
    """The rows of one model: LoRA on q,v (where the model has them) and on all layers; prefix and prompt
    tuning on causal LMs, when this lightning_peft has them."""
    rows = [_lora(bench.qv)] if bench.qv is not None else []
    if not (mode == "smoke" and rows):  # smoke: one LoRA row per model
        rows.append(_lora(bench.all_layers))
    if bench.causal_lm:
        if hasattr(lightning_peft, "PrefixTuningConfig"):
            rows.append(_virtual_tokens("prefix", "PrefixTuningConfig", "PrefixTuningConfig"))
        if hasattr(lightning_peft, "PromptTuningConfig"):
            rows.append(_virtual_tokens("prompt", "PromptTuningConfig", "PromptTuningConfig"))
    for row in rows:
        row.repeats = 1 if mode == "smoke" else 3
    return rows

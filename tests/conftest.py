"""Shared test set-up: offline Hugging Face, one thread, a tiny CPU Trainer factory and LoRA's dropout masks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., Any]:
    """``make_trainer(**overrides)``: a tiny CPU Trainer (2 batches, 1 epoch, no logger, files under tmp_path)."""
    import lightning as L

    def make(**overrides: Any) -> L.Trainer:
        defaults: dict[str, Any] = dict(
            accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            default_root_dir=tmp_path,
        )
        return L.Trainer(**{**defaults, **overrides})

    return make


@pytest.fixture
def dropout_masks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every keep-mask LoRA dropout draws (lightning_peft.lora.dropout.keep_mask), forward and backward, in order."""
    import lightning_peft.lora.dropout as lora_dropout

    drawn: list[Any] = []
    draw = lora_dropout.keep_mask

    def recording(*args: Any) -> Any:
        drawn.append(draw(*args))
        return drawn[-1]

    monkeypatch.setattr(lora_dropout, "keep_mask", recording)
    return drawn

"""Soft prompts learn: a frozen model able to do a task but not cued for it, and the Lightning glue (callback, mixin).

The backbone is a tiny BERT pre-trained here (about 7 s on one CPU thread) on two tasks over 8 digits, chosen by a
cue token in front: cue A asks whether the first digit is >= 5, cue B whether the last digit is >= 5; any other
token in front means task A. The frozen model can do task B, but without cue B it answers task A (chance on B's
labels). A one-token prompt, trained on task B's labels alone, has to learn to be the cue.
"""

from __future__ import annotations

import copy
import os
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from lightning_peft import PEFTMixin, PromptTuning, PromptTuningConfig, inject  # noqa: E402

CUE_A, CUE_B, DIGITS = 13, 14, 8


def task_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digit token ids (3..12), task A labels (first digit >= 5) and task B labels (last digit >= 5)."""
    digits = torch.randint(0, 10, (n, DIGITS), generator=generator)
    return digits + 3, (digits[:, 0] >= 5).long(), (digits[:, -1] >= 5).long()


def cued(ids: torch.Tensor, cue: int) -> torch.Tensor:
    return torch.cat([torch.full((ids.shape[0], 1), cue), ids], 1)


def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        ids, a, b = task_data(128, generator)
        other = torch.cat([torch.randint(0, 13, (43, 1), generator=generator), ids[85:]], 1)  # not a cue: task A
        inputs = torch.cat([cued(ids[:42], CUE_A), cued(ids[42:85], CUE_B), other])
        loss = F.cross_entropy(model(input_ids=inputs).logits, torch.cat([a[:42], b[42:85], a[85:]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    ids, _, b = task_data(2000, torch.Generator().manual_seed(1))
    return ids, b


def test_prompt_learns_a_task_the_frozen_model_can_do_but_is_not_cued_for(backbone, test_set) -> None:
    ids, labels = test_set
    cued_accuracy = accuracy(backbone, cued(ids, CUE_B), labels)
    model = inject(copy.deepcopy(backbone), PromptTuningConfig(num_tokens=1, init="random"))
    before = accuracy(model, ids, labels)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    generator = torch.Generator().manual_seed(2)
    start = time.perf_counter()
    for _ in range(60):
        train_ids, _, train_labels = task_data(128, generator)
        loss = F.cross_entropy(model(input_ids=train_ids).logits, train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    after = accuracy(model, ids, labels)
    print(f"\ntask B accuracy: cued frozen model {cued_accuracy:.3f}, uncued with prompt at init {before:.3f}, "
          f"after 60 prompt steps (batch 128, {seconds:.1f} s) {after:.3f}")
    assert cued_accuracy > 0.95  # able
    assert before < 0.65  # not cued
    assert after > 0.95
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed == {"bert.embeddings.word_embeddings.prompt"}


def test_callback_object_also_works_with_plain_inject(backbone) -> None:
    model = inject(copy.deepcopy(backbone), PromptTuning(num_tokens=8))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["bert.embeddings.word_embeddings.prompt"]
    assert model(input_ids=torch.full((2, 5), 4)).logits.shape == (2, 2)


class TaskB(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        return F.cross_entropy(self.model(input_ids=ids).logits, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)


def task_b_loader(n: int = 60 * 64) -> DataLoader:
    ids, _, labels = task_data(n, torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(ids, labels), batch_size=64)


def test_prompt_tuning_callback_trains_the_prompt_in_trainer_fit_and_saves_it_alone(backbone, test_set, tmp_path) -> None:
    module = TaskB(copy.deepcopy(backbone).train())
    trainer = L.Trainer(max_epochs=1, callbacks=[PromptTuning(num_tokens=1)], default_root_dir=tmp_path,
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, task_b_loader())
    assert accuracy(module.model, *test_set) > 0.95
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert set(checkpoint["state_dict"]) == {"model.bert.embeddings.word_embeddings.prompt"}
    assert checkpoint["lightning_peft"]["methods"][0]["method"] == "prompt"


class PixelClassifier(PEFTMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

    def configure_peft(self) -> list:
        return [PromptTuning(kind="pixels", width=2, image_size=8)]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def test_mixin_pixel_prompt_trains_and_load_from_checkpoint_restores_it(tmp_path) -> None:
    module = PixelClassifier()
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,)))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=8))
    prompt = module.net[0].prompt_top.detach()
    assert prompt.abs().sum() > 0  # moved from its zero start
    restored = PixelClassifier.load_from_checkpoint(next(tmp_path.rglob("*.ckpt")))
    torch.testing.assert_close(restored.net[0].prompt_top, prompt)
    torch.testing.assert_close(restored.net[0].base_layer.weight, module.net[0].base_layer.weight)


def test_prompt_tuning_is_configurable_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=PromptTuning)
    config = parser.parse_string(
        "callback:\n  class_path: lightning_peft.PromptTuning\n  init_args:\n    num_tokens: 10\n    deep: true\n"
        "    image_size: [32, 48]\n    truncation: left\n"
    )
    callback = parser.instantiate_classes(config).callback
    assert isinstance(callback, PromptTuning)
    assert (callback.num_tokens, callback.deep, callback.image_size, callback.truncation) == (10, True, [32, 48], "left")

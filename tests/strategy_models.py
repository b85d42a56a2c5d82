"""Tiny LightningModules shared by the multi-process tests (importable by spawned workers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ, SAMPLES = 64, 12, 32


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config)


def token_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=generator)


class CausalLM(L.LightningModule):
    """A tiny GPT-2 trained on fixed tokens; rank r of N reads samples r, r+N, ... so N processes with batch b
    see exactly the samples one process sees with batch N*b (no shuffling)."""

    def __init__(self, batch_size: int = 8, lr: float = 0.05, dump_to: str | None = None) -> None:
        super().__init__()
        self.model = tiny_gpt2()
        self.batch_size, self.lr, self.dump_to = batch_size, lr, dump_to

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(TensorDataset(token_data()[rank::world]), batch_size=self.batch_size, shuffle=False)

    def on_train_end(self) -> None:
        if self.dump_to and self.trainer.global_rank == 0:
            from lightning_peft import adapter_state_dict

            torch.save({k: v.clone() for k, v in adapter_state_dict(self).items()}, Path(self.dump_to))


MethodFactory = Callable[[], L.Callback]


def end_process() -> NoReturn:
    """End a multi-process script: wait for every rank, destroy the gloo group, then leave at once.

    A process that exits the normal way can abort in the C++ teardown ("terminate called without an active
    exception", SIGABRT) after all its work is done, which fails the launch; seen in CI under load, also with the
    group destroyed first. Every script's results are written before this, so it skips the interpreter's teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def shard_gpt2(model: torch.nn.Module, mesh: object) -> None:
    """FSDP2 ``fully_shard`` of :func:`tiny_gpt2`'s blocks, then of the whole model: a sharding helper in a file
    of its own, with ``fully_shard`` bound at import, as projects keep them (lightning_peft cannot inject before
    it runs)."""
    for block in model.transformer.h:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

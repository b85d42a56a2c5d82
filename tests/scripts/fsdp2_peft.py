"""FSDP2 (ModelParallelStrategy + fully_shard) with one method on 2 CPU processes; run with torch.distributed.run:
``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp2_peft.py OUT_DIR lora|prefix|prompt``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from strategy_models import CausalLM, end_process
from torch.distributed.fsdp import fully_shard

from lightning_peft import PEFTMixin


class ShardedLM(PEFTMixin, CausalLM):
    method = "lora"

    def configure_peft(self) -> list[L.Callback]:
        from test_strategies import METHODS

        return [METHODS[self.method]()]

    def configure_model(self) -> None:
        self.apply_peft()  # adapters must exist before the model is sharded
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def main(out: Path, method: str) -> None:
    ShardedLM.method = method
    module = ShardedLM(batch_size=4)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            before.update({n: full(p) for n, p in pl_module.named_parameters()})

    trainer.callbacks.append(Snapshot())
    trainer.fit(module)
    after = {n: full(p) for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    report = {
        "trained": bool(trainable) and all(not torch.equal(before[n], after[n]) for n in trainable),
        "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in after if n not in trainable),
        "trainable": sorted(trainable),
    }
    if trainer.global_rank == 0:
        torch.save(report, out / "fsdp2.pt")
        print(report)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_process()

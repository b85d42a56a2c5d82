"""FSDP2 (ModelParallelStrategy + fully_shard in configure_model) on 2 CPU processes, every method, through the
callback and through the mixin, and the ``EXTRA_CELLS`` (DoRA, LoRA with dropout) through the callback, in one launch.

The model is built in ``__init__`` and sharded in ``configure_model`` (Lightning's FSDP2 pattern); neither glue
calls ``apply_peft()`` first: the plugin injects on the first ``fully_shard`` call. Rank r trains on samples
r, r+2, ... in batches of 4 for one epoch (4 SGD steps), so the steps equal one process's with batches of 8.
Rank 0 writes ``OUT/<method>-<glue>.pt``: the trainable tensors gathered after fit, and the checkpoint
``trainer.save_checkpoint`` wrote (a full file). ``OUT/refused.pt`` holds the error of a module whose
``configure_model`` shards through a helper in another file, which the plugin cannot see before it shards.
Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp2_peft.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from strategy_models import (
    EXTRA_CELLS,
    METHODS,
    TRAINABLE,
    CausalLM,
    end_process,
    make_methods,
    shard_gpt2,
)
from torch.distributed.fsdp import fully_shard

from lightning_peft import PEFTMixin


class ShardedLM(PEFTMixin, CausalLM):
    """The mixin, calling ``apply_peft()`` itself before sharding (the explicit form; fsdp2_checkpoints.py)."""

    method = "lora"

    def configure_peft(self) -> list[L.Callback]:
        return [METHODS[self.method]()]

    def configure_model(self) -> None:
        self.apply_peft()
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class CallbackLM(CausalLM):
    """Lightning's documented FSDP2 module, unaware of the plugin: a callback gives it the adapters."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class MixinLM(PEFTMixin, CallbackLM):
    """The same module with its methods from ``configure_peft``, without an ``apply_peft()`` call."""

    method = "lora"

    def configure_peft(self) -> list[L.Callback]:
        return [METHODS[self.method](trainable_modules=TRAINABLE)]


class HelperLM(CausalLM):
    """Shards through a helper function defined in another file: the plugin sees that only afterwards."""

    def configure_model(self) -> None:
        shard_gpt2(self.model, self.device_mesh["data_parallel"])


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def fit(module: L.LightningModule, callbacks: list[L.Callback], checkpoint: Path) -> dict[str, torch.Tensor]:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module)
    trained = {n: full(p) for n, p in module.named_parameters() if p.requires_grad}
    trainer.save_checkpoint(checkpoint)  # every rank: gathers the full state; rank 0 writes
    return trained


def main(out: Path) -> None:
    for method in sorted(METHODS):
        MixinLM.method = method
        for glue in ("callback", "mixin"):
            module = CallbackLM(batch_size=4) if glue == "callback" else MixinLM(batch_size=4)
            callbacks = [METHODS[method](trainable_modules=TRAINABLE)] if glue == "callback" else []
            path = out / f"{method}-{glue}.ckpt"
            trained = fit(module, callbacks, checkpoint=path)
            if torch.distributed.get_rank() == 0:
                saved = torch.load(path, weights_only=True)["state_dict"]
                torch.save({"trained": trained, "saved": saved}, out / f"{method}-{glue}.pt")
    for cell in EXTRA_CELLS:  # through the callback
        path = out / f"{cell}-callback.ckpt"
        trained = fit(CallbackLM(batch_size=4), make_methods(cell, trainable_modules=TRAINABLE), checkpoint=path)
        if torch.distributed.get_rank() == 0:
            saved = torch.load(path, weights_only=True)["state_dict"]
            torch.save({"trained": trained, "saved": saved}, out / f"{cell}-callback.pt")
    try:
        fit(HelperLM(batch_size=4), [METHODS["lora"]()], checkpoint=out / "refused.ckpt")
        refused = ""
    except ValueError as error:  # on every rank, in configure_model, before any step
        refused = str(error)
    if torch.distributed.get_rank() == 0:
        torch.save({"refused": refused}, out / "refused.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process()

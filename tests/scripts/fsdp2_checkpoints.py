"""Adapter-only checkpoints under FSDP2 (ModelParallelStrategy) on 2 CPU processes, full and sharded.

For every METHOD given (one launch) and each of ``save_distributed_checkpoint=False`` (one full file) and ``True``
(a torch.distributed.checkpoint directory): train 2 epochs straight; train 1 epoch with a checkpoint; resume it for
a second epoch. Rank 0 writes ``OUT/<method>/<mode>.pt``: the straight and resumed adapter tensors and the tensor
names the checkpoint holds.
Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp2_checkpoints.py OUT METHOD...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from fsdp2_peft import ShardedLM, full
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from strategy_models import end_process


class MomentumLM(ShardedLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # an optimizer with state: Lightning's full-checkpoint restore indexes the first state entry
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def fit(out: Path, run: str, sharded: bool, epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    module = MomentumLM(batch_size=4)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded)
    checkpoint = ckpt_path is None and epochs == 1
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                        callbacks=[ModelCheckpoint(dirpath=out / run, save_last=True)] if checkpoint else [],
                        enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module, ckpt_path=ckpt_path)
    return {n: full(p) for n, p in module.named_parameters() if p.requires_grad}


def saved_names(path: Path) -> list[str]:
    if path.is_dir():  # torch.distributed.checkpoint: model tensors are stored as "state_dict.<name>"
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return sorted(k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict."))
    return sorted(torch.load(path, weights_only=True)["state_dict"])


def main(out: Path, method: str) -> None:
    MomentumLM.method = method
    for mode in ("full", "sharded"):
        sharded = mode == "sharded"
        straight = fit(out, f"{mode}-straight", sharded, epochs=2)
        fit(out, mode, sharded, epochs=1)
        last = out / mode / "last.ckpt"
        resumed = fit(out, f"{mode}-resumed", sharded, epochs=2, ckpt_path=last)
        if torch.distributed.get_rank() == 0:
            torch.save({"straight": straight, "resumed": resumed, "saved": saved_names(last)}, out / f"{mode}.pt")


if __name__ == "__main__":
    for method in sys.argv[2:]:
        main(Path(sys.argv[1]) / method, method)
    end_process()

"""DDP across two nodes, simulated on one machine: two torchrun agents (``--nnodes 2 --node_rank 0|1``, one CPU
process each) meet at ``--master_addr 127.0.0.1``, and ``Trainer(num_nodes=2, devices=1, strategy="ddp")`` reads
the node and global ranks from their environment, as on a cluster. Each rank trains on every other sample; the
global rank 0 writes the adapter tensors and the checkpoint.
Run: ``python -m torch.distributed.run --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr 127.0.0.1
--master_port PORT multinode_ddp.py OUT METHOD`` once per node.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from strategy_models import CausalLM, end_process


def main(out: Path, method: str) -> None:
    from test_strategies import METHODS

    module = CausalLM(batch_size=4, dump_to=str(out / "multinode.pt"))
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", max_epochs=1, logger=False,
                        callbacks=[METHODS[method](), ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module)
    torch.save({"node_rank": trainer.node_rank, "global_rank": trainer.global_rank, "world_size": trainer.world_size},
               out / f"node{trainer.node_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    end_process()

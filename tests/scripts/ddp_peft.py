"""Lightning's DDP (``strategy="ddp"``) on 2 CPU processes (gloo), every method with a ``trainable_modules``
entry, DoRA and LoRA with dropout (``EXTRA_CELLS``), and LoRA with a token prompt on one model (``COMPOSED``,
2 epochs: in 1, the first LoRA ``A`` barely moves while its ``B`` leaves zero), in one launch: on one node
(``torchrun --standalone --nproc_per_node 2``) or across two nodes simulated on one machine (two torchrun agents,
``--nnodes 2 --node_rank 0|1``, one process each, meeting at ``--master_addr 127.0.0.1``;
``Trainer(num_nodes=2, devices=1)`` reads the node and global ranks from their environment, as on a cluster).

Rank r trains on samples r, r+2, ... in batches of 4, so each SGD step sees the samples one process sees with
batches of 8. Per method: ``cut``, 1 epoch with a ``ModelCheckpoint`` (``OUT/<method>/last.ckpt``, written by
rank 0); on one node also ``straight``, 2 epochs, and ``resumed``, 2 epochs from the ``cut`` checkpoint. Rank 0
writes each run's trainable tensors after fit to ``OUT/<method>.pt``; every rank writes its node rank, global rank
and world size to ``OUT/node<node rank>-rank<global rank>.pt``.
Run: ``python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_peft.py OUT 1``, or once per node
``python -m torch.distributed.run --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr 127.0.0.1
--master_port PORT ddp_peft.py OUT 2``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from strategy_models import COMPOSED, EXTRA_CELLS, METHODS, TRAINABLE, CausalLM, end_process, make_methods

from lightning_peft import adapter_state_dict


def fit(out: Path, method: str, nodes: int, epochs: int, ckpt_path: Path | None = None,
        checkpoint: bool = False) -> tuple[L.Trainer, dict[str, torch.Tensor]]:
    callbacks: list[L.Callback] = make_methods(method, trainable_modules=TRAINABLE)
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=out / method, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=2 // nodes, num_nodes=nodes, strategy="ddp", max_epochs=epochs,
                        logger=False, callbacks=callbacks, enable_checkpointing=checkpoint, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    module = CausalLM(batch_size=4)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, {name: tensor.clone() for name, tensor in adapter_state_dict(module).items()}


def main(out: Path, nodes: int) -> None:
    for method in [*sorted(METHODS), COMPOSED, *EXTRA_CELLS]:
        trainer, cut = fit(out, method, nodes, epochs=2 if method == COMPOSED else 1, checkpoint=True)
        runs = {"cut": cut}
        if nodes == 1 and method in METHODS:
            runs["straight"] = fit(out, method, nodes, epochs=2)[1]
            runs["resumed"] = fit(out, method, nodes, epochs=2, ckpt_path=out / method / "last.ckpt")[1]
        if trainer.global_rank == 0:
            torch.save(runs, out / f"{method}.pt")
    ranks = {"node_rank": trainer.node_rank, "global_rank": trainer.global_rank, "world_size": trainer.world_size}
    torch.save(ranks, out / f"node{trainer.node_rank}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    end_process()

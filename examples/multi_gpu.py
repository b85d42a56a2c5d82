"""Multi-GPU recipe: the same LoRA run under DDP, FSDP (1 and 2) and DeepSpeed, with adapter-only checkpoints.

What changes between strategies is one ``Trainer(strategy=...)`` argument; the adapters are injected before the
strategy wraps the model (right after ``configure_model``), so DDP, FSDP and DeepSpeed only ever see the final
set of trainable parameters. Launch commands (``--devices`` GPUs per node)::

    # DDP, one node: Lightning starts one process per GPU
    python examples/multi_gpu.py --strategy ddp --devices 4
    # DDP, several nodes (or any cluster launcher: SLURM, torchrun); the same script on every node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $MASTER:29500 \\
        examples/multi_gpu.py --strategy ddp --devices 8 --num-nodes 2
    # FSDP1: lightning_peft.fsdp_auto_wrap_policy gives adapters and the frozen layers they wrap units of their
    # own (a flat unit must be all-trainable or all-frozen); blocks are sharded as units
    python examples/multi_gpu.py --strategy fsdp --devices 4 --precision bf16-mixed
    # FSDP2 (fully_shard, per-parameter sharding, mixed trainable/frozen units are fine): inject, then shard
    python examples/multi_gpu.py --strategy fsdp2 --devices 4
    # DeepSpeed ZeRO-2 or ZeRO-3 (pip install deepspeed): the engine gets only the trainable parameters, and the
    # callback sets exclude_frozen_parameters=True, so its checkpoint directories hold the adapters alone
    python examples/multi_gpu.py --strategy deepspeed --devices 4 --precision bf16-mixed
    python examples/multi_gpu.py --strategy deepspeed3 --devices 4 --precision bf16-mixed
    # a DeepSpeed checkpoint directory to an adapter folder (ZeRO-3 slices joined, weights-only loads)
    lightning-peft-export OUT/lora-step=N.ckpt adapter_out --prefix net.

On a CPU-only machine, ``--quick`` runs the DDP path for real: ``ddp_spawn`` with 2 gloo processes, a few steps,
an adapter-only checkpoint, and a check that both processes hold identical adapters after training.

Notes for real runs:

* ``find_unused_parameters`` can stay ``False``: every adapter is used in every step.
* Checkpoints (``ModelCheckpoint``) hold adapter and ``trainable_modules`` tensors only, under every strategy;
  resume with ``trainer.fit(model, ckpt_path=...)`` after building the same model (the backbone comes from its
  usual weights).
* Adapter initialisation is seeded per layer name, so all processes start from the same adapters without
  relying on the global RNG.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import quiet_lightning
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import LoRA, adapter_state_dict, inject, trainable_summary
from lightning_peft.adapter_files.export import read_checkpoint


class DigitsTransformer(L.LightningModule):
    """A small transformer classifier for 8x8 digits whose layers are built in ``configure_model``.

    Building layers in ``configure_model`` is Lightning's pattern for models too large for one device (FSDP
    and DeepSpeed can create them sharded); the LoRA callback injects right after this hook. With
    ``fully_shard_blocks`` (FSDP2) the hook injects itself first, then shards, since ``fully_shard`` must see
    the adapters.
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, lr: float = 3e-3,
                 fully_shard_blocks: bool = False) -> None:
        super().__init__()
        self.dim, self.depth, self.heads, self.lr = dim, depth, heads, lr
        self.fully_shard_blocks = fully_shard_blocks
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        layer = nn.TransformerEncoderLayer(self.dim, self.heads, 2 * self.dim, dropout=0.0, batch_first=True)
        self.net = nn.ModuleDict({
            "stem": nn.Conv2d(1, self.dim, kernel_size=2, stride=2),  # 8x8 image -> 16 tokens
            "encoder": nn.TransformerEncoder(layer, self.depth, enable_nested_tensor=False),
            "head": nn.Linear(self.dim, 10),
        })
        if self.fully_shard_blocks:
            self._inject_and_shard()

    def _inject_and_shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        inject(self, *[cb for cb in self.trainer.callbacks if isinstance(cb, LoRA)])  # the callback then skips it
        self.strict_loading = False  # checkpoints hold adapter tensors only
        mesh = self.device_mesh["data_parallel"]
        for block in self.net["encoder"].layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.net["stem"](images).flatten(2).transpose(1, 2)  # (B, 16, dim)
        return self.net["head"](self.net["encoder"](tokens).mean(dim=1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class CheckRanksAgree(L.Callback):
    """After training, every process compares a checksum of its adapter tensors with rank 0's and reports it."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = adapter_state_dict(pl_module)
        checksum = torch.stack([t.double().sum() for t in state.values()]).sum().reshape(1)
        sums = trainer.strategy.all_gather(checksum)  # (world_size, 1)
        if trainer.global_rank == 0:
            print(trainable_summary(pl_module))
            print(f"adapter checksums per rank: {[round(float(s), 6) for s in sums.flatten()]} "
                  f"-> ranks agree: {bool(torch.allclose(sums, sums[0]))}; {len(state)} adapter tensors")


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    return TensorDataset(images, torch.tensor(data.target))


def make_strategy(name: str) -> object:
    """The Trainer strategy for ``name``, configured for adapters (see the module docstring)."""
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_peft import fsdp_auto_wrap_policy

        return FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(nn.TransformerEncoderLayer), use_orig_params=True)
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(tensor_parallel_size=1)
    if name in ("deepspeed", "deepspeed3"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=3 if name == "deepspeed3" else 2)  # the callback excludes frozen parameters
    return name  # "ddp", "ddp_spawn", "auto"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", default="ddp",
                        choices=["ddp", "ddp_spawn", "fsdp", "fsdp2", "deepspeed", "deepspeed3"])
    parser.add_argument("--devices", type=int, default=-1, help="devices per node (-1: all)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: ddp_spawn on 2 processes, 4 steps")
    args = parser.parse_args()
    quiet_lightning()
    accelerator, strategy, devices = "auto", args.strategy, args.devices
    if args.quick:
        accelerator, strategy, devices = "cpu", "ddp_spawn", 2
    out = args.out or Path(tempfile.mkdtemp())

    L.seed_everything(0, verbose=False)
    model = DigitsTransformer(fully_shard_blocks=strategy == "fsdp2")
    lora = LoRA(r=8, alpha=16, target_modules=["linear1", "linear2", "self_attn"], trainable_modules=["head"])
    checkpoint = ModelCheckpoint(dirpath=out, filename="lora-{step}")
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=args.num_nodes, strategy=make_strategy(strategy),
        precision=args.precision, max_epochs=1 if args.quick else args.epochs, limit_train_batches=4 if args.quick else None,
        callbacks=[lora, checkpoint, CheckRanksAgree()], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(digits(), batch_size=32, shuffle=True)
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        saved = read_checkpoint(checkpoint.best_model_path or checkpoint.last_model_path)  # a file or DeepSpeed's dir
        size = sum(t.numel() for t in saved["state_dict"].values())
        print(f"checkpoint {Path(checkpoint.best_model_path).name}: {len(saved['state_dict'])} tensors, {size:,} numbers "
              f"(adapters and head only), methods {[m['method'] for m in saved['lightning_peft']['methods']]}")


if __name__ == "__main__":
    main()

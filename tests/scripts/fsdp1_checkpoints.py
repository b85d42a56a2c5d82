"""Adapter-only checkpoints under Lightning's FSDPStrategy (FSDP1) on 1 or 2 CPU processes, full and sharded.

Lightning refuses FSDP without a GPU for the ``"fsdp"`` flag and the exact ``FSDPStrategy`` class (its accelerator
connector), and gives FSDP the CPU's device index ``None``, which FSDP1 reads as "find an accelerator"; with
``device_id=cpu`` torch's FSDP1 runs on CPU over gloo. :class:`CPUFSDPStrategy` lifts exactly those: wrapping
(``fsdp_auto_wrap_policy``), saving and restoring are Lightning's own code.
Each CELL is ``<method>-callback`` or ``<method>-mixin`` (the adapters from ``PEFTMixin.configure_peft``), always
with a ``trainable_modules`` entry; one launch runs every cell given. Rank r trains on samples r, r+N, ... in
batches of 8 / N (SGD with momentum). For ``state_dict_type="full"`` (one file) and ``"sharded"`` (a
torch.distributed.checkpoint directory) with Lightning's default ``use_orig_params=True``, and ``"sharded"`` with
``use_orig_params=False`` (flat parameters): train 1 epoch with a checkpoint (``cut``); train 2 epochs straight;
resume the checkpoint for a second epoch. Rank 0 writes ``OUT/<cell>/<mode>-<use_orig_params>.pt``: each run's
trainable tensors after fit; the checkpoint is ``OUT/<cell>/<mode>-<use_orig_params>/last.ckpt``.
``OUT/<cell>/checks.pt`` holds the errors of loading the full and the sharded checkpoint into another method (its
adapter tensors are missing), and, for ``state_dict_type="full"`` with ``use_orig_params=False`` (no checkpoint),
the error the callback raised (prompt tuning) or the warnings it gave.
Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp1_checkpoints.py OUT CELL...``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed.fsdp as torch_fsdp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from strategy_models import METHODS, TRAINABLE, CausalLM, end_process
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.utils.data import DataLoader
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from lightning_peft import AdapterStateError, PEFTMixin, adapter_state_dict, fsdp_auto_wrap_policy

RUNS = [("full", True), ("sharded", True), ("sharded", False)]  # (state_dict_type, use_orig_params)


class _FSDPOnCPU(FSDP):
    """FSDP1 told it runs on the CPU: Lightning passes the CPU device's index, ``None``, which FSDP refuses."""

    def __init__(self, *args: Any, device_id: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU (see the module docstring): a subclass passes the connector's check, and
    the model is wrapped by Lightning's own ``_setup_model`` with FSDP given the CPU device."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        original = torch_fsdp.FullyShardedDataParallel
        torch_fsdp.FullyShardedDataParallel = _FSDPOnCPU  # type: ignore[misc]
        try:
            return super()._setup_model(model)
        finally:
            torch_fsdp.FullyShardedDataParallel = original  # type: ignore[misc]


class MomentumLM(CausalLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # an optimizer with state, so resuming has something to restore besides the adapters
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


class MixinLM(PEFTMixin, MomentumLM):
    """The same model with its adapters from ``configure_peft`` instead of a callback."""

    method = "lora"

    def configure_peft(self) -> list[L.Callback]:
        return [METHODS[self.method](trainable_modules=TRAINABLE)]


def fit(out: Path, run: str, method: str, mode: str, orig_params: bool, epochs: int, ckpt_path: Path | None = None,
        checkpoint: bool = True, mixin: bool = False, validate: bool = False) -> dict[str, torch.Tensor]:
    strategy = CPUFSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(GPT2Block), state_dict_type=mode,
                               use_orig_params=orig_params)
    checkpoint = checkpoint and ckpt_path is None and epochs == 1
    callbacks: list[L.Callback] = [] if mixin else [METHODS[method](trainable_modules=TRAINABLE)]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=out / run, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy,
                        max_epochs=epochs, logger=False, callbacks=callbacks, enable_checkpointing=checkpoint,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    MixinLM.method = method
    module = (MixinLM if mixin else MomentumLM)(batch_size=8 // int(os.environ["WORLD_SIZE"]))  # 4 steps an epoch
    (trainer.validate if validate else trainer.fit)(module, ckpt_path=ckpt_path)
    with FSDP.summon_full_params(trainer.strategy.model):
        return {name: tensor.clone() for name, tensor in adapter_state_dict(module).items()}


def main(out: Path, method: str, mixin: bool) -> None:
    # prompt tuning is refused with use_orig_params=False (see run_refused); a full checkpoint with it fails
    # inside Lightning for any model, so the callback warns instead of running into it
    runs = [run for run in RUNS if method != "prompt" or run[1]]
    for mode, orig_params in runs:
        run = f"{mode}-{orig_params}"
        cut = fit(out, run, method, mode, orig_params, epochs=1, mixin=mixin)
        straight = fit(out, f"{run}-straight", method, mode, orig_params, epochs=2, mixin=mixin)
        resumed = fit(out, f"{run}-resumed", method, mode, orig_params, epochs=2, ckpt_path=out / run / "last.ckpt",
                      mixin=mixin)
        if torch.distributed.get_rank() == 0:
            torch.save({"cut": cut, "straight": straight, "resumed": resumed}, out / f"{run}.pt")
    other = "prefix" if method == "lora" else "lora"  # its adapter tensors are not in this method's checkpoint
    mismatch = {}
    # sharded: refused by the load planner. full: Lightning loads the weights (strict=False) before
    # on_load_checkpoint, which then refuses (validate: resuming a fit fails earlier, in the optimizer state)
    for mode in ("sharded", "full"):
        try:
            fit(out, f"other-{mode}", other, mode, True, epochs=2, ckpt_path=out / f"{mode}-True" / "last.ckpt",
                validate=mode == "full")
            mismatch[mode] = ""
        except AdapterStateError as error:  # on every rank
            mismatch[mode] = str(error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit(out, "flat-full", method, "full", False, epochs=1, ckpt_path=None, checkpoint=False)
            refused = ""
        except ValueError as error:
            refused = str(error)
    if torch.distributed.get_rank() == 0:
        torch.save({"refused": refused, "warnings": [str(w.message) for w in caught], "mismatch": mismatch},
                   out / "checks.pt")


if __name__ == "__main__":
    for cell in sys.argv[2:]:
        method, glue = cell.split("-")
        (Path(sys.argv[1]) / cell).mkdir(exist_ok=True)
        main(Path(sys.argv[1]) / cell, method, mixin=glue == "mixin")
    end_process()

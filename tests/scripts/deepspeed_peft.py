"""Lightning's DeepSpeedStrategy (ZeRO-2 or ZeRO-3) with one method on 2 CPU processes (gloo).

Lightning refuses DeepSpeed without CUDA in two places (``setup_environment`` and the device-index check in
``setup_distributed``) and passes the CPU device's index ``None`` to DeepSpeed. :class:`CPUDeepSpeedStrategy`
lifts exactly those; DeepSpeed itself runs on its CPU accelerator, and everything else (engine, ZeRO
partitioning, checkpoint save and resume) is the strategy's own code. ZeRO-3 runs with
``stage3_param_persistence_threshold=0``, so even the smallest adapter tensor is partitioned.

Runs, each rank reading every other sample (the same 8 samples per step as one process with batch 8):
``one``: 1 epoch with a checkpoint, then ``save_adapter`` and ``load_adapter_state_dict`` on every rank;
``straight``: 2 epochs; ``resumed``: 2 epochs from the checkpoint of ``one``; ``built``: 1 epoch of a model built
in ``configure_model`` (under ZeRO-3 inside ``deepspeed.zero.Init``, so base weights are partitioned before the
adapters are injected); ``bf16``: 1 epoch under ``bf16-mixed`` with a checkpoint (DeepSpeed then names its optimizer
files ``bf16_zero_pp_rank_*``).
The ``EXTRA_CELLS`` (DoRA, LoRA with dropout) run ``one`` only (DoRA under ZeRO-3 ``built`` too). Every METHOD
given runs in one launch, into ``OUT/<method>``. Rank 0 writes each run's gathered adapter tensors at the start and
end of training to ``OUT/<method>/<run>-start.pt`` and ``OUT/<method>/<run>.pt``, with the token embedding's spread
(a random prompt's scale) and DoRA's start (``magnitude_error``) in ``OUT/<method>/<run>-info.pt``.
Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 deepspeed_peft.py OUT STAGE METHOD...``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from strategy_models import EXTRA_CELLS, CausalLM, end_process, make_methods, tiny_gpt2

from lightning_peft import adapter_state_dict, load_adapter_state_dict, save_adapter
from lightning_peft.zero3 import gathered

# DeepSpeed JIT-compiles a shared-memory all-reduce for CPU when a compiler is present (slow to build, and it
# aborted one process at exit in CI); gloo alone is enough here. (`deepspeed.comm.torch` as an attribute is torch.)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy without its CUDA-only checks (see the module docstring)."""

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()  # skip only the CUDAAccelerator check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed needs a device index; its CPU accelerator ignores it


class BuiltInConfigureModel(CausalLM):
    """The large-model pattern: the model is created in ``configure_model``, under the strategy's init context."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.model = None  # type: ignore[assignment]

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_gpt2()


class Snapshot(L.Callback):
    """Gathers (on every rank: a collective under ZeRO-3) the adapters as training starts, and the embedding's std."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.embedding_std = 0.0
        self.magnitude_error = 0.0  # DoRA: max |m - ‖W‖| at the start, the norm written out over Conv1D's inputs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {name: tensor.clone() for name, tensor in adapter_state_dict(pl_module).items()}
        weight = next(p for n, p in pl_module.named_parameters() if n.endswith(("wte.weight", "wte.base_layer.weight")))
        with gathered([weight]):
            self.embedding_std = weight.detach().float().std().item()
        for module in pl_module.modules():
            magnitude = getattr(module, "lora_magnitude", None)
            if magnitude is not None:
                base = module.base_layer.weight
                with gathered([base, magnitude]):
                    norm = base.detach().norm(dim=0)  # Conv1D's weight is (in, out): one norm per output unit
                    error = (magnitude.detach() - norm).abs().max().item()
                self.magnitude_error = max(self.magnitude_error, error)


def fit(out: Path, run: str, method: str, stage: int, *, epochs: int, module: CausalLM | None = None,
        ckpt_path: str | None = None, checkpoint: bool = False, precision: str = "32-true") -> None:
    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True}
    strategy = CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")  # exclude_frozen set by the callback
    snapshot = Snapshot()
    callbacks: list[L.Callback] = [*make_methods(method), snapshot]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=out / run, save_last=True))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision=precision, max_epochs=epochs,
                        callbacks=callbacks, logger=False, enable_checkpointing=checkpoint, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    module = module or CausalLM(batch_size=4)
    trainer.fit(module, ckpt_path=ckpt_path)
    state = {n: t.clone() for n, t in adapter_state_dict(module).items()}  # every rank: ZeRO-3 gathers collectively
    reloaded = True
    if run == "one":
        save_adapter(module.model, out / "adapter")  # the transformers model alone, loadable into a fresh one
        save_adapter(module.model, out / "adapter-peft", format="peft")  # Hugging Face PEFT's layout
        shifted = {name: tensor + 1 for name, tensor in state.items()}
        load_adapter_state_dict(module, shifted)  # every rank: rank 0's copy is scattered into the partitions
        reloaded = all(torch.equal(t, shifted[n]) for n, t in adapter_state_dict(module).items())
    if trainer.global_rank == 0:
        torch.save(state, out / f"{run}.pt")
        torch.save(snapshot.start, out / f"{run}-start.pt")
        torch.save({"exclude_frozen_parameters": strategy.exclude_frozen_parameters, "reloaded": reloaded,
                    "embedding_std": snapshot.embedding_std, "magnitude_error": snapshot.magnitude_error,
                    "partitioned": [n for n, p in module.named_parameters() if p.numel() == 0]}, out / f"{run}-info.pt")
    trainer.strategy.barrier()


def main(out: Path, method: str, stage: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fit(out, "one", method, stage, epochs=1, checkpoint=True)
    if method in EXTRA_CELLS:  # what these cells check (DoRA's magnitude, each rank's masks) takes one run,
        if method == "dora" and stage == 3:  # and DoRA injected next to partitioned weights (its norm gathers W)
            fit(out, "built", method, stage, epochs=1, module=BuiltInConfigureModel(batch_size=4))
        return
    fit(out, "straight", method, stage, epochs=2)
    fit(out, "resumed", method, stage, epochs=2, ckpt_path=str(out / "one" / "last.ckpt"))
    fit(out, "built", method, stage, epochs=1, module=BuiltInConfigureModel(batch_size=4))
    fit(out, "bf16", method, stage, epochs=1, checkpoint=True, precision="bf16-mixed")


if __name__ == "__main__":
    for method in sys.argv[3:]:
        main(Path(sys.argv[1]) / method, method, int(sys.argv[2]))
    end_process()

"""Tiny LightningModules, the methods under test and the 1-process reference, shared by the strategy tests and
their multi-process scripts (importable by spawned workers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import LoRA, PrefixTuning, PromptTuning, adapter_state_dict, inject

VOCAB, SEQ, SAMPLES = 64, 12, 32
METHODS: dict[str, Callable[..., L.Callback]] = {
    "lora": lambda **kw: LoRA(r=4, alpha=8, target_modules=["c_attn", "c_proj"], **kw),
    "prefix": lambda **kw: PrefixTuning(num_tokens=3, **kw),
    "prompt": lambda **kw: PromptTuning(num_tokens=3, init="random", **kw),
}
COMPOSED = "lora+prompt"  # two methods on one model: under DDP (find_unused_parameters=False) every tensor trains
#: Cells beside the methods of :data:`METHODS`, each run once per distributed launch (DDP: the 1-epoch run; FSDP2:
#: the callback; DeepSpeed: ``one``): DoRA (its magnitude trains with A and B) and LoRA with adapter-input dropout.
#: Dropout masks are seeded per step (:attr:`CausalLM.MASK_SEED`), so :func:`one_process_trainables` with ``ranks``
#: redraws each rank's masks for that rank's rows.
DROPOUT_CELL = "lora_dropout"
EXTRA_CELLS: dict[str, Callable[..., L.Callback]] = {
    "dora": lambda **kw: LoRA(r=4, alpha=8, target_modules=["c_attn", "c_proj"], dora=True, **kw),
    DROPOUT_CELL: lambda **kw: LoRA(r=4, alpha=8, target_modules=["c_attn", "c_proj"], dropout=0.25, **kw),
}


def make_methods(name: str, **kwargs: object) -> list[L.Callback]:
    """The callbacks of ``name``: one of :data:`METHODS` or :data:`EXTRA_CELLS`, or several joined by ``+``
    (:data:`COMPOSED`)."""
    return [{**METHODS, **EXTRA_CELLS}[part](**kwargs) for part in name.split("+")]


TRAINABLE = ["ln_f"]  # a trainable_modules entry beside the adapters: GPT-2's final norm (FSDP's root unit)
RTOL, ATOL = 1e-5, 1e-6  # a multi-process run against one process: float sums in another order


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

    MASK_SEED = 1000  #: step k's dropout masks come from ``torch.manual_seed(MASK_SEED + k)``, on every rank

    def on_train_batch_start(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        torch.manual_seed(self.MASK_SEED + self.global_step)

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
            torch.save({k: v.clone() for k, v in adapter_state_dict(self).items()}, Path(self.dump_to))


def fit_lm(tmp_path: Path, method: str, name: str, *, devices: int, batch_size: int, epochs: int,
           ckpt_path: str | None = None, method_kwargs: dict | None = None, strategy: str = "ddp_spawn",
           **trainer_kwargs: object) -> tuple[L.Trainer, CausalLM, dict[str, torch.Tensor]]:
    """Fit a :class:`CausalLM`; returns the trainer, the module and the adapter tensors rank 0 dumped."""
    dump = tmp_path / f"{name}.pt"
    module = CausalLM(batch_size=batch_size, dump_to=str(dump))
    callbacks = [METHODS[method](**(method_kwargs or {}))]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy if devices > 1 else "auto", max_epochs=epochs,
        callbacks=callbacks, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, torch.load(dump, weights_only=True)


def fit_adapters(tmp_path: Path, method: str, name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    """:func:`fit_lm`'s adapter tensors only."""
    return fit_lm(tmp_path, method, name, **kwargs)[2]


def one_process_trainables(method: str, epochs: int = 1, batch_size: int = 8, momentum: float = 0.0,
                           in_module: bool = True, ranks: int = 1, **method_kwargs: object) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds (adapters and ``trainable_modules``) after SGD on one process,
    ``epochs`` passes over the samples in order in batches of ``batch_size``: what N ranks reading samples r, r+N,
    ... in batches of ``batch_size / N`` step to. ``in_module``: inject into a :class:`CausalLM` as the callbacks
    do (names ``model.*``, which seed the adapters' init), rather than into the bare model. ``ranks``: each step's
    gradient is the mean of the ``ranks`` row subsets' (rank r's rows ``r::ranks``), each drawn with the masks
    that rank draws (the step's :attr:`CausalLM.MASK_SEED`): what data parallelism computes with dropout.

    Every tensor must move by more than ``ATOL``, so that none passes a comparison without having trained.
    """
    root = CausalLM() if in_module else tiny_gpt2()
    inject(root, *make_methods(method, **method_kwargs))
    model = root.model if in_module else root
    start = {name: tensor.clone() for name, tensor in adapter_state_dict(root).items()}
    optimizer = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.05, momentum=momentum)
    for step, batch in enumerate(token_data().split(batch_size) * epochs):
        for rank in range(ranks):
            torch.manual_seed(CausalLM.MASK_SEED + step)
            rows = batch[rank::ranks]
            (model(input_ids=rows, labels=rows).loss / ranks).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {name: tensor.clone() for name, tensor in adapter_state_dict(root).items()}
    untrained = [name for name, tensor in trained.items() if (tensor - start[name]).abs().max() <= ATOL]
    assert trained and not untrained, f"one process did not train {untrained}"
    return trained


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str,
                        exact: bool = False) -> None:
    """``got`` holds exactly the names of ``expected``, with its values to ``RTOL``/``ATOL`` (``exact``: bitwise)."""
    assert got.keys() == expected.keys(), f"{label}: names differ: {sorted(got.keys() ^ expected.keys())}"
    rtol, atol = (0.0, 0.0) if exact else (RTOL, ATOL)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=atol,
                                   msg=lambda message, name=name: f"{label}: {name}: {message}")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The module tensors of a Lightning checkpoint rank 0 wrote: a file's ``state_dict``, or the ``model`` entries
    of a torch.distributed.checkpoint directory (FSDPStrategy's sharded format), read here on one process."""
    if not path.is_dir():
        return torch.load(path, weights_only=True)["state_dict"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, path.with_suffix(".pt"))
    return torch.load(path.with_suffix(".pt"), weights_only=True)["model"]


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

"""Lightning glue: method callbacks that inject adapters before the strategy wraps the model.

``Callback.setup`` runs before ``configure_model``; when the LightningModule builds its layers there, the
callback injects right after it instead. Either way the adapters exist before DDP/FSDP/DeepSpeed and the
optimizer capture the parameters. Checkpoints then hold adapter tensors only (also with
``ModelCheckpoint(save_weights_only=True)``, which skips callback hooks: the module's own hook does it).
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_peft.core import Method, applied_methods, inject, trainable_summary
from lightning_peft.lora import LoRAConfig
from lightning_peft.state import check_adapter_state, check_base_shapes, checkpoint_metadata, adapter_tensors

CHECKPOINT_KEY = "lightning_peft"


def prepare_module(pl_module: pl.LightningModule, methods: list[Method]) -> None:
    """Inject ``methods`` into a LightningModule (once each) and make its checkpoints adapter-only."""
    todo = [m for m in methods if all(m is not done for done in applied_methods(pl_module))]
    if not todo:
        return
    inject(pl_module, *todo)
    pl_module.strict_loading = False  # checkpoints hold adapter tensors only; we check them ourselves
    rank_zero_info(f"lightning_peft: {', '.join(type(m).__name__ for m in todo)} injected; {trainable_summary(pl_module)}")


def keep_adapter_tensors(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Drop frozen base weights from a Lightning checkpoint and record the methods and base shapes."""
    if not applied_methods(pl_module):
        return
    names = {name for name, _ in adapter_tensors(pl_module)}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
    checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(pl_module)


def check_checkpoint(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint made for another base model or missing adapter tensors; warn on a plain one."""
    if not applied_methods(pl_module):
        return
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        rank_zero_warn(
            "lightning_peft: the checkpoint has no adapter metadata (it was saved without lightning_peft); "
            "its base weights load, adapters keep their current values."
        )
        return
    check_base_shapes(pl_module, meta["base_shapes"])
    check_adapter_state(pl_module, checkpoint["state_dict"])


class _RunAfter:
    """``module.<hook>`` replacement: run the module's own hook, then ``after(module, *args)``."""

    def __init__(self, module: pl.LightningModule, hook: str, after: Any) -> None:
        self.module, self.hook, self.after = module, hook, after
        self.original = getattr(module, hook)
        functools.update_wrapper(self, self.original)

    def __call__(self, *args: Any) -> Any:
        result = self.original(*args)
        self.after(self.module, *args)
        return result


def _install(module: pl.LightningModule, hook: str, after: Any) -> None:
    current = getattr(module, hook)
    if isinstance(current, _RunAfter) and current.after is after:
        return
    setattr(module, hook, _RunAfter(module, hook, after))


class _MethodCallback(Callback):
    """Shared Lightning glue of the method callbacks (``LoRA``, ``PrefixTuning``, ``PromptTuning``)."""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**{k: repr(v) for k, v in self.to_dict().items()})  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_peft.mixin import PEFTMixin

        if not isinstance(pl_module, PEFTMixin):  # the mixin has these hooks already
            _install(pl_module, "on_save_checkpoint", keep_adapter_tensors)
            _install(pl_module, "on_load_checkpoint", check_checkpoint)
        if is_overridden("configure_model", pl_module):  # layers may be built there: inject right after it
            _install(pl_module, "configure_model", functools.partial(_inject_after_configure, method=self))
        else:
            prepare_module(pl_module, [self])  # type: ignore[list-item]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.to_dict()}  # type: ignore[attr-defined]

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("config", {}), self.to_dict()  # type: ignore[attr-defined]
        changed = {k: (saved[k], now.get(k)) for k in saved if saved[k] != now.get(k)}
        if changed:
            rank_zero_warn(f"lightning_peft: resuming {type(self).__name__} with other arguments than saved: {changed}")


def _inject_after_configure(pl_module: pl.LightningModule, *, method: Method) -> None:
    prepare_module(pl_module, [method])


class LoRA(LoRAConfig, _MethodCallback):
    """LoRA as a Lightning callback: freezes the model and trains low-rank updates of the selected layers.

    Takes the arguments of :class:`~lightning_peft.lora.LoRAConfig` (``r``, ``alpha``, ``dropout``,
    ``target_modules``, ``exclude_modules``, ``trainable_modules``, ...). The same object also works without a
    Trainer: ``inject(model, LoRA(r=8))``.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["query", "value"],
                                            trainable_modules=["classifier"])])
    """

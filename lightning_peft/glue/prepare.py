"""Lightning glue: when and how adapters are injected into a LightningModule, for the callbacks and the mixin.

``Callback.setup`` runs before ``configure_model``; when the LightningModule builds its layers there, a method
callback injects right after it instead (and, under FSDP2, before the first ``fully_shard`` inside it). The mixin
injects after ``configure_model`` too. Either way the adapters exist before DDP/FSDP/DeepSpeed and the optimizer
capture the parameters, and checkpoints then hold adapter tensors only. Both go through the hook extensions of
:mod:`lightning_peft.glue.hooks`; what they remember on the module is in its
:class:`~lightning_peft.record.Record`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft.glue.checkpoints import check_checkpoint, keep_adapter_tensors
from lightning_peft.glue.hooks import overrides_hook, run_after, run_inside, steps_after
from lightning_peft.glue.strategies import (
    check_fsdp1_flat_parameters,
    inject_before_fully_shard,
    prepare_strategy,
    refuse_sharded_module,
    restore_fsdp1_after_backward,
)
from lightning_peft.injection import applied_methods, inject
from lightning_peft.methods import Method
from lightning_peft.operations import trainable_summary
from lightning_peft.record import record


def same_method(a: Method, b: Method) -> bool:
    """Whether two method objects describe the same adapters (the same object, or equal configurations)."""
    return a is b or a.to_dict() == b.to_dict()


def prepare_module(pl_module: pl.LightningModule, methods: list[Method]) -> None:
    """Inject ``methods`` into a LightningModule and make its checkpoints adapter-only.

    Idempotent per method: a method equal to one already injected (same configuration, also after the module
    was deep-copied or pickled) is skipped, so repeated ``fit``/``test`` calls and a callback next to a mixin
    that asks for the same method never adapt a layer twice.
    """
    todo: list[Method] = []
    for method in methods:
        if not any(same_method(method, done) for done in [*applied_methods(pl_module), *todo]):
            todo.append(method)
    strategy = getattr(getattr(pl_module, "_trainer", None), "strategy", None)
    if methods:  # also on a later fit, whose new Trainer brings a new strategy
        prepare_strategy(strategy)
    if todo:
        refuse_sharded_module(pl_module)
        inject(pl_module, *todo)
        pl_module.strict_loading = False  # checkpoints hold adapter tensors only; check_checkpoint checks them
        names = ", ".join(type(m).__name__ for m in todo)
        rank_zero_info(f"lightning_peft: {names} injected; {trainable_summary(pl_module)}")
    if methods:
        check_fsdp1_flat_parameters(strategy, pl_module)


def extend_checkpoint_hooks(pl_module: pl.LightningModule) -> None:
    """Checkpoints of ``pl_module`` hold adapter tensors only and are checked when they load; FSDP1's frozen units
    are mended after each backward. Each step runs once per hook call, however often this is called."""
    run_after(pl_module, "on_save_checkpoint", keep_adapter_tensors)
    run_after(pl_module, "on_load_checkpoint", check_checkpoint)
    run_after(pl_module, "on_after_backward", restore_fsdp1_after_backward)


def inject_after_configure_model(pl_module: pl.LightningModule, method: Method) -> None:
    """Inject ``method`` right after the module's next ``configure_model`` (which may build the layers), or at its
    first ``fully_shard`` if that comes earlier."""
    pending = record(pl_module).pending
    if not any(same_method(method, m) for m in pending):
        pending.append(method)
    run_inside(pl_module, "configure_model", _steps_before_fully_shard)
    run_after(pl_module, "configure_model", _inject_pending)


def _inject_pending(pl_module: pl.LightningModule, *_: Any) -> None:
    found = record(pl_module)
    methods, found.pending = found.pending, []
    prepare_module(pl_module, methods)


def _steps_before_fully_shard(pl_module: pl.LightningModule) -> contextlib.AbstractContextManager[None]:
    """FSDP2: the injection steps of ``configure_model`` run before it shards the first module."""
    return inject_before_fully_shard(pl_module, functools.partial(_run_configure_steps, pl_module))


def _run_configure_steps(pl_module: pl.LightningModule) -> None:
    for step in steps_after(pl_module, "configure_model"):  # each is idempotent: they run again after the hook
        step(pl_module)


class OwnsPEFT(Protocol):
    """A LightningModule that owns its PEFT set-up (:class:`~lightning_peft.mixin.PEFTMixin`)."""

    def apply_peft(self) -> None: ...


def _apply_peft(module: OwnsPEFT, *_: Any) -> None:
    module.apply_peft()  # through the instance: a subclass's own apply_peft runs


def extend_own_hooks(module: Any) -> None:
    """The hooks of a module that owns its PEFT set-up: ``apply_peft`` after ``configure_model`` (under FSDP2
    before its first ``fully_shard``) and before the checkpoint checks of ``on_load_checkpoint``, plus
    :func:`extend_checkpoint_hooks`. On the instance, so the user's hooks need not call ``super()``."""
    run_inside(module, "configure_model", _steps_before_fully_shard)
    run_after(module, "configure_model", _apply_peft)
    run_after(module, "on_load_checkpoint", _apply_peft)  # load_from_checkpoint: the adapters exist before the check
    extend_checkpoint_hooks(module)


def owns_peft_setup(module: Any) -> bool:
    """Whether ``module`` got :func:`extend_own_hooks` (it is a PEFTMixin module), without importing the mixin."""
    return _apply_peft in steps_after(module, "configure_model")


def callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` under both of its package names.

    Lightning ships one code base under two names, lightning.pytorch and pytorch_lightning, with separate classes,
    and each Trainer type-checks against its own (single callbacks, LightningCLI's ``callbacks:``). Subclassing
    both Callback classes makes one callback class valid for either Trainer.
    """
    if importlib.util.find_spec("pytorch_lightning") is None:
        return (Callback,)
    import pytorch_lightning

    return (Callback, pytorch_lightning.Callback)


class MethodCallback(*callback_bases()):  # type: ignore[misc]
    """Shared Lightning glue of the method callbacks (``LoRA``, ``PrefixTuning``, ``PromptTuning``).

    A subclass also derives from its method's config (``class LoRA(LoRAConfig, MethodCallback)``), which
    provides ``attach``, ``trainable_rules`` and ``to_dict``. In ``setup`` the callback injects its method, or,
    when the LightningModule builds layers in ``configure_model``, right after that hook; both are before
    ``strategy.setup`` wraps the model and the optimizer sees the parameters.
    """

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**{k: repr(v) for k, v in self.to_dict().items()})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        extend_checkpoint_hooks(pl_module)  # a PEFTMixin module has these steps already: they run once
        if overrides_hook(pl_module, "configure_model"):  # layers may be built there: inject right after it
            inject_after_configure_model(pl_module, self)
        else:
            prepare_module(pl_module, [self])

    @override
    def state_dict(self) -> dict[str, Any]:
        # a record of the arguments; the key holds them all, so a resumed callback finds only a state equal to its
        # own (check_checkpoint compares the methods a checkpoint was saved with to the model's, and warns)
        return {"config": self.to_dict()}

"""Lightning glue: a LightningModule mixin that owns its PEFT set-up."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_peft.callbacks import (
    check_checkpoint,
    inject_before_fully_shard,
    keep_adapter_tensors,
    prepare_module,
    restore_fsdp1_after_backward,
)
from lightning_peft.injection import applied_methods
from lightning_peft.methods import Method

if TYPE_CHECKING:  # type-checked as the LightningModule it is mixed into; at run time a plain mixin
    from lightning.pytorch import LightningModule as _MixinBase
else:
    _MixinBase = object


class PEFTMixin(_MixinBase):
    """Give a LightningModule adapters from :meth:`configure_peft`, adapter-only checkpoints, and a
    ``load_from_checkpoint`` that rebuilds them.

    Adapters are injected when ``configure_model`` runs (after your own ``configure_model``, if you define one),
    which Lightning does before the strategy wraps the model and also inside ``load_from_checkpoint``.
    Your own ``on_save_checkpoint``/``on_load_checkpoint`` keep working: the PEFT step runs after them, whether
    or not they call ``super()``. Put the mixin first: ``class Classifier(PEFTMixin, L.LightningModule)``; it
    works with ``lightning.pytorch`` and ``pytorch_lightning`` modules alike.

    Example::

        class Classifier(PEFTMixin, L.LightningModule):
            def configure_peft(self):
                return [LoRA(r=4, target_modules=r"backbone\\.layer[34]\\..*conv\\d")]
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook, step in _PEFT_STEPS.items():
            own = cls.__dict__.get(hook)
            if own is not None and not getattr(own, "_peft_wrapped", False):
                setattr(cls, hook, _then(own, step))

    def configure_peft(self) -> Sequence[Method]:
        """Return the methods to inject, e.g. ``[LoRA(r=8, target_modules=["query", "value"])]``."""
        raise NotImplementedError(f"{type(self).__name__} uses PEFTMixin: define configure_peft() returning methods.")

    def apply_peft(self) -> None:
        """Inject the methods of :meth:`configure_peft` now (idempotent; Lightning calls it via configure_model)."""
        # once configured, the applied methods again: nothing new is injected, but a new Trainer's strategy is prepared
        done = self.__dict__.get("_peft_configured")
        prepare_module(self, applied_methods(self) if done else list(self.configure_peft()))
        self._peft_configured = True

    @override
    def configure_model(self) -> None:
        super().configure_model()  # a base class may build layers here

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)

    @override
    def on_after_backward(self) -> None:
        super().on_after_backward()


def _configure_step(module: PEFTMixin) -> None:
    module.apply_peft()  # through the instance: a subclass's own apply_peft runs


def _load_step(module: PEFTMixin, checkpoint: dict[str, Any]) -> None:
    module.apply_peft()
    check_checkpoint(module, checkpoint)


#: Hooks a subclass may define itself, and the PEFT step that must still run after them.
_PEFT_STEPS: dict[str, Callable[..., None]] = {
    "configure_model": _configure_step,
    "on_save_checkpoint": keep_adapter_tensors,
    "on_load_checkpoint": _load_step,
    "on_after_backward": restore_fsdp1_after_backward,
}


def _peft_before_fully_shard(module: PEFTMixin) -> contextlib.AbstractContextManager[None]:
    return inject_before_fully_shard(module, module.apply_peft)  # FSDP2: inject before configure_model shards


#: Hooks whose outermost call runs inside a context (as the callbacks' configure_model does).
_PEFT_CONTEXTS: dict[str, Callable[[PEFTMixin], contextlib.AbstractContextManager[None]]] = {
    "configure_model": _peft_before_fully_shard,
}


def _then(hook: Callable[..., None], step: Callable[..., None]) -> Callable[..., None]:
    """``hook``, then ``step`` once: only the outermost of nested calls (a ``super()`` chain) runs the step, so
    it always follows all of the user's code, e.g. layers built after ``super().configure_model()``. The outermost
    call also runs inside the hook's context in ``_PEFT_CONTEXTS``, if any."""

    @functools.wraps(hook)
    def wrapped(self: PEFTMixin, *args: Any) -> None:
        depth_key = f"_peft_depth_{hook.__name__}"
        depth = self.__dict__.get(depth_key, 0)
        self.__dict__[depth_key] = depth + 1
        context = _PEFT_CONTEXTS.get(hook.__name__) if depth == 0 else None
        try:
            with context(self) if context is not None else contextlib.nullcontext():
                hook(self, *args)
        finally:
            self.__dict__[depth_key] = depth
        if depth == 0:
            step(self, *args)

    wrapped._peft_wrapped = True  # type: ignore[attr-defined]
    return wrapped


for _hook, _step in _PEFT_STEPS.items():  # the mixin's own hooks too: they run a base class's hook, then the step
    setattr(PEFTMixin, _hook, _then(PEFTMixin.__dict__[_hook], _step))

"""Lightning glue: a LightningModule mixin that owns its PEFT set-up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import Self, override

from lightning_peft.glue.prepare import extend_own_hooks, prepare_module
from lightning_peft.injection import applied_methods
from lightning_peft.methods import Method
from lightning_peft.record import record
from lightning_peft.spawn import install_spawn_recovery

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

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # the PEFT steps extend the instance's hooks (as the callbacks do), so they run after the class's hooks
        # whatever their super() chain; also made for copies and unpickled modules, whose state then replaces them
        module = super().__new__(cls)
        extend_own_hooks(module)
        return module

    def configure_peft(self) -> Sequence[Method]:
        """Return the methods to inject, e.g. ``[LoRA(r=8, target_modules=["query", "value"])]``."""
        raise NotImplementedError(f"{type(self).__name__} uses PEFTMixin: define configure_peft() returning methods.")

    def apply_peft(self) -> None:
        """Inject the methods of :meth:`configure_peft` now (idempotent; Lightning calls it via configure_model)."""
        # once configured, the applied methods again: nothing new is injected, but a new Trainer's strategy is prepared
        found = record(self)
        prepare_module(self, applied_methods(self) if found.configured else list(self.configure_peft()))
        found.configured = True

    @override
    def configure_model(self) -> None:
        super().configure_model()  # defined, so Lightning calls it: a base class may build layers here


install_spawn_recovery()  # ddp_spawn/ddp_notebook: the main process's module gets the workers' adapters

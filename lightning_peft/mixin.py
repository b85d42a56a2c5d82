"""Lightning glue: a LightningModule mixin that owns its PEFT set-up."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import override

from lightning_peft.callbacks import check_checkpoint, keep_adapter_tensors, prepare_module
from lightning_peft.core import Method


class PEFTMixin:
    """Give a LightningModule adapters from :meth:`configure_peft`, adapter-only checkpoints, and a
    ``load_from_checkpoint`` that rebuilds them.

    Adapters are injected when ``configure_model`` runs (after your own ``configure_model``, if you define one),
    which Lightning does before the strategy wraps the model and also inside ``load_from_checkpoint``.
    Put the mixin first: ``class Classifier(PEFTMixin, L.LightningModule)``.

    Example::

        class Classifier(PEFTMixin, L.LightningModule):
            def configure_peft(self):
                return [LoRA(r=4, target_modules=r"backbone\\.layer[34]\\..*conv\\d")]
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("configure_model")
        if own is not None and not getattr(own, "_peft_wrapped", False):
            cls.configure_model = _then_apply_peft(own)  # type: ignore[method-assign]

    def configure_peft(self) -> Sequence[Method]:
        """Return the methods to inject, e.g. ``[LoRA(r=8, target_modules=["query", "value"])]``."""
        raise NotImplementedError(f"{type(self).__name__} uses PEFTMixin: define configure_peft() returning methods.")

    def apply_peft(self) -> None:
        """Inject the methods of :meth:`configure_peft` now (idempotent; Lightning calls it via configure_model)."""
        if self.__dict__.get("_peft_configured"):
            return
        self._peft_configured = True
        prepare_module(self, list(self.configure_peft()))  # type: ignore[arg-type]

    def configure_model(self) -> None:
        self.apply_peft()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        keep_adapter_tensors(self, checkpoint)  # type: ignore[arg-type]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self.apply_peft()
        check_checkpoint(self, checkpoint)  # type: ignore[arg-type]


def _then_apply_peft(configure_model: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(configure_model)
    def wrapped(self: PEFTMixin) -> None:
        configure_model(self)
        self.apply_peft()

    wrapped._peft_wrapped = True  # type: ignore[attr-defined]
    return wrapped

"""Lightning glue: under a spawn or fork launcher (``ddp_spawn``, ``ddp_notebook``) the main process's module gets
the trained adapters back.

The workers inject and train; the main process never ran ``setup`` or ``configure_model``, so its module has no
adapter tensors, and Lightning loads the workers' weights into it with ``strict=False``, which would drop them
without a word. Before that load, :func:`install_spawn_recovery`'s wrapper gives the main process's module the
same adapters (the trainer's method callbacks, or the mixin's ``configure_peft``), with the checkpoint hooks, so
``trainer.save_checkpoint``, ``save_adapter`` and evaluation there see the trained values; an adapter tensor the
workers' weights lack raises :class:`~lightning_peft.errors.AdapterStateError`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from lightning_peft.errors import AdapterStateError
from lightning_peft.glue.prepare import MethodCallback, owns_peft_setup
from lightning_peft.injection import applied_methods
from lightning_peft.tensors import adapter_tensors

_LAUNCHER_MODULES = ("lightning.pytorch.strategies.launchers.multiprocessing",
                     "pytorch_lightning.strategies.launchers.multiprocessing")


def install_spawn_recovery() -> None:
    """Wrap ``_MultiProcessingLauncher._recover_results_in_main_process`` of both Lightning packages (once).

    The wrapper changes nothing for a trainer without lightning_peft callbacks and a module without the mixin."""
    for name in _LAUNCHER_MODULES:
        if importlib.util.find_spec(name.partition(".")[0]) is None:
            continue
        launcher = importlib.import_module(name)._MultiProcessingLauncher
        current = launcher._recover_results_in_main_process
        if not getattr(current, "_peft_recovers", False):
            launcher._recover_results_in_main_process = _recovering(current)


def _recovering(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def recover(launcher: Any, worker_output: Any, trainer: Any) -> None:
        module = trainer.lightning_module
        if worker_output.weights_path is None or module is None or not _adapt_main_process_module(trainer, module):
            original(launcher, worker_output, trainer)
            return
        names = {name for name, _ in adapter_tensors(module)}
        handle = module.register_load_state_dict_post_hook(functools.partial(_refuse_missing_adapters, names))
        try:
            original(launcher, worker_output, trainer)  # Lightning's load_state_dict(strict=False)
        finally:
            handle.remove()

    recover._peft_recovers = True  # type: ignore[attr-defined]
    return recover


def _adapt_main_process_module(trainer: Any, module: Any) -> bool:
    """Inject the methods the workers injected; whether the module has adapters now."""
    callbacks = [callback for callback in trainer.callbacks if isinstance(callback, MethodCallback)]
    if not callbacks and not owns_peft_setup(module):  # neither method callbacks nor PEFTMixin
        return False
    for callback in callbacks:  # the checkpoint hooks; injects now, or right after configure_model
        callback.setup(trainer, module, "fit")
    module.configure_model()  # idempotent (Lightning's contract): builds what the workers built, then injects
    return bool(applied_methods(module))


def _refuse_missing_adapters(names: set[str], module: Any, incompatible: Any) -> None:
    missing = sorted(names & set(incompatible.missing_keys))
    if missing:
        raise AdapterStateError(
            f"the weights the workers sent back lack {len(missing)} adapter tensors of {type(module).__name__} "
            f"({', '.join(missing[:4])}): the main process's module would keep their initial values. Inject the "
            "same methods in the workers and the main process (the same callbacks, or PEFTMixin)."
        )

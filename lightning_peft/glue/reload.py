"""Lightning glue: rebuild a LightningModule trained with the method callbacks from one of its checkpoints.

A callback-trained module's checkpoint holds the adapter tensors and a record of the methods, but the module class
itself knows nothing of them, so ``MyModule.load_from_checkpoint(path)`` finds ~100 adapter tensors it has no
parameters for. :func:`load_from_checkpoint` builds the module as Lightning does (the saved hyperparameters, your
keyword arguments on top), runs its ``configure_model``, injects the recorded methods and loads the adapter tensors.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl

from lightning_peft.adapter_files.checkpoint import read_checkpoint
from lightning_peft.adapter_files.dispatch import load_checkpoint_adapter
from lightning_peft.glue.hooks import overrides_hook
from lightning_peft.glue.prepare import extend_checkpoint_hooks

ModuleT = TypeVar("ModuleT", bound=pl.LightningModule)


def load_from_checkpoint(module_class: type[ModuleT], checkpoint_path: str | Path, **init_kwargs: Any) -> ModuleT:
    """Rebuild a LightningModule trained with ``LoRA``/``PrefixTuning``/``PromptTuning`` callbacks from a checkpoint.

    The module is built from the hyperparameters it saved (``save_hyperparameters()``) with ``init_kwargs`` on
    top, its ``configure_model`` runs, the methods recorded in the checkpoint are injected and their tensors
    loaded: the module computes what it computed when the checkpoint was saved. Its later checkpoints hold
    adapter tensors only, as under the callbacks. The checkpoint is read with ``torch.load(weights_only=True)``;
    tensors stay on the CPU (move the module where you need it).

    Args:
        module_class: The LightningModule class that was trained.
        checkpoint_path: A ``.ckpt`` file (or DeepSpeed's checkpoint directory) saved while the callbacks ran.
        **init_kwargs: Constructor arguments, overriding the saved hyperparameters (required where none were saved).

    Returns:
        The rebuilt module, in training mode as a freshly built module is.

    Raises:
        AdapterStateError: The checkpoint holds no adapter record (it was saved without lightning_peft), or its
            tensors do not fit the module.
        BaseModelMismatchError: The module's base tensors differ in names or shapes from those the checkpoint
            was saved with (other ``init_kwargs`` than in training, say).

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, target_modules=["query", "value"])])
        trainer.fit(Classifier(lr=1e-3))                       # saves e.g. checkpoints/last.ckpt
        model = load_from_checkpoint(Classifier, "checkpoints/last.ckpt")
    """
    path = Path(checkpoint_path)
    checkpoint = read_checkpoint(path)
    module = module_class(**_init_arguments(module_class, {**checkpoint.get("hyper_parameters", {}), **init_kwargs}))
    if overrides_hook(module, "configure_model"):
        module.configure_model()
    load_checkpoint_adapter(module, checkpoint, str(path))
    extend_checkpoint_hooks(module)
    module.strict_loading = False  # its checkpoints hold adapter tensors only, as under the callbacks
    return module


def _init_arguments(module_class: type, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` that ``module_class.__init__`` takes (all of them if it takes ``**kwargs``), as Lightning's
    ``load_from_checkpoint`` filters saved hyperparameters."""
    parameters = inspect.signature(module_class).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {name: value for name, value in arguments.items() if name in parameters}

"""``save_adapter`` and ``load_adapter``: one call for both formats; loading recognises a PEFT directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import nn

from lightning_peft.adapter_files.checkpoint import adapter_of_checkpoint, is_lightning_checkpoint, read_checkpoint
from lightning_peft.adapter_files.constants import CONFIG_NAME, WEIGHTS_NAME
from lightning_peft.adapter_files.native import check_metadata, load_native, load_recorded_adapter, save_native
from lightning_peft.adapter_files.peft_load import is_peft_directory, load_peft
from lightning_peft.adapter_files.peft_save import save_peft
from lightning_peft.state import base_shapes, refuse_merged, restored_on_error


def save_adapter(model: nn.Module, path: str | Path, format: Literal["native", "peft"] = "native") -> Path:
    """Save the adapter of ``model`` to the directory ``path`` (safetensors + JSON config); returns the directory.

    ``format="peft"`` writes Hugging Face PEFT's layout instead (``peft.PeftModel.from_pretrained(base, path)``
    loads it), and raises a ``ValueError`` for features PEFT has no equivalent for; see
    :mod:`lightning_peft.adapter_files.peft_save`. In a distributed run rank 0 writes, the other ranks
    write nothing; under DeepSpeed ZeRO-3 call it on every rank: the partitioned tensors are gathered first.

    Example:
        >>> import tempfile
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> sorted(p.name for p in save_adapter(model, tempfile.mkdtemp()).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    if format == "peft":
        return save_peft(model, path)
    if format != "native":
        raise ValueError(f"format={format!r} is not one of 'native', 'peft'.")
    return save_native(model, path)


def load_adapter(model: nn.Module, path: str | Path, *, strict_base: bool = False) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; inject its methods first if needed.

    A directory saved by Hugging Face PEFT (or with ``format="peft"``) is recognised and read too, and so is a
    Lightning checkpoint saved with adapters (a ``.ckpt`` file, or DeepSpeed's checkpoint directory): ``model`` is
    then the LightningModule that was trained, freshly built, or the base model inside it (``lit.model``; the
    checkpoint's names are matched to it). The load is all or nothing: when it fails, ``model`` is left as it was
    (no adapters injected, hooks, ``requires_grad`` flags and values unchanged).

    Adapters record a fingerprint of the base weights they were trained on: loading into other weights of the same
    shapes (a re-seeded model, pretrained weights not loaded yet) warns with a ``PEFTWarning`` naming the first
    layers that differ, or raises with ``strict_base=True``. Files without a fingerprint load as before.

    Raises:
        BaseModelMismatchError: ``model`` is not the base model the adapter was saved from (other names or
            shapes; with ``strict_base``, also other weights).
        AdapterStateError: The file's tensors do not fit the model's adapters, hold NaN/inf or integers where the
            model has floats, a file is corrupt, or ``model``'s adapters are merged.
        FileNotFoundError: The directory lacks a file (a pickle-only folder is refused, with how to convert it).
    """
    directory = Path(path)
    if directory.name in (WEIGHTS_NAME, CONFIG_NAME) and directory.is_file():
        directory = directory.parent  # one of the two files of an adapter directory: the directory is meant
    refuse_merged(model, str(directory))
    if is_lightning_checkpoint(directory):
        return load_checkpoint_adapter(model, read_checkpoint(directory), str(directory), strict_base)
    if is_peft_directory(directory):
        with restored_on_error(model):
            return load_peft(model, directory)
    return load_native(model, directory, strict_base)


def load_checkpoint_adapter(model: nn.Module, checkpoint: dict[str, Any], source: str, strict_base: bool = False
                            ) -> nn.Module:
    """Load the adapter of a read Lightning ``checkpoint`` into ``model`` (as :func:`load_adapter` does for a
    checkpoint file); ``source`` names it in errors."""
    state, meta = adapter_of_checkpoint(checkpoint, set(base_shapes(model)), source)
    check_metadata(meta, source)
    return load_recorded_adapter(model, meta, state, source, strict_base)

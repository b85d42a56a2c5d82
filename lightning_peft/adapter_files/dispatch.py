"""``save_adapter`` and ``load_adapter``: one call for both formats; loading recognises a PEFT directory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from lightning_peft.adapter_files.native import load_native, save_native
from lightning_peft.adapter_files.peft_load import is_peft_directory, load_peft
from lightning_peft.adapter_files.peft_save import save_peft
from lightning_peft.state import refuse_merged, restored_on_error


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


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; inject its methods first if needed.

    A directory saved by Hugging Face PEFT (or with ``format="peft"``) is recognised and read too. The load is all
    or nothing: when it fails, ``model`` is left as it was (no adapters injected, hooks, ``requires_grad`` flags and
    values unchanged).

    Raises:
        BaseModelMismatchError: ``model`` is not the base model the adapter was saved from.
        AdapterStateError: The file's tensors do not fit the model's adapters, hold NaN/inf or integers where the
            model has floats, a file is corrupt, or ``model``'s adapters are merged.
        FileNotFoundError: The directory lacks a file (a pickle-only folder is refused, with how to convert it).
    """
    directory = Path(path)
    refuse_merged(model, str(directory))
    if is_peft_directory(directory):
        with restored_on_error(model):
            return load_peft(model, directory)
    return load_native(model, directory)

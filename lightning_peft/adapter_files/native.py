"""The native adapter format: safetensors + JSON that record the methods, so loading can inject them.

A native adapter is a directory with ``adapter_model.safetensors`` (adapter tensors and the tensors of
``trainable_modules``, nothing else) and ``adapter_config.json`` (format version, method configurations and
the base model's parameter shapes). Loading never executes code. A Lightning checkpoint's ``"lightning_peft"``
entry is the same metadata (:func:`checkpoint_metadata`).

Each save writes a fresh ``save_id`` into both files (the JSON and the safetensors header). The two files are
replaced one after the other, so a process killed between the renames leaves new tensors beside the old config;
loading compares the ids and refuses such a pair instead of loading tensors with another save's methods.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_peft.adapter import is_injected
from lightning_peft.adapter_files.constants import CONFIG_NAME, FORMAT_VERSION, NATIVE_TENSOR_METADATA, WEIGHTS_NAME
from lightning_peft.adapter_files.disk import read_config, read_tensor_metadata, read_tensors, write_adapter_files
from lightning_peft.errors import AdapterStateError, BaseModelMismatchError, PEFTWarning
from lightning_peft.fingerprint import base_fingerprint, fingerprint_mismatch
from lightning_peft.injection import inject
from lightning_peft.methods import Method, MethodConfig
from lightning_peft.state import (
    base_shapes,
    check_base_shapes,
    load_adapter_state_dict,
    method_configs,
    restored_on_error,
)
from lightning_peft.tensors import adapter_state_dict
from lightning_peft.zero3 import is_nonzero_rank


def checkpoint_metadata(model: nn.Module, state_dict: dict[str, Any] | None = None, fingerprint: bool = True
                        ) -> dict[str, Any]:
    """What an adapter checkpoint records beside the tensors: format, method configurations, base shapes and the
    base weights' fingerprint (:mod:`lightning_peft.fingerprint`; pass ``fingerprint=False`` where the local
    weights are flat shards, as under FSDP1)."""
    return {
        "format_version": FORMAT_VERSION,
        "methods": method_configs(model),
        "base_shapes": base_shapes(model, state_dict),
        "base_fingerprint": base_fingerprint(model) if fingerprint else {},
    }


def save_native(model: nn.Module, path: str | Path) -> Path:
    """Save the adapter of ``model`` to the directory ``path`` in the native format; returns the directory.

    In a distributed run rank 0 writes and the other ranks write nothing (data-parallel ranks hold the same
    adapters; two ranks writing one directory would interleave their two files). Under DeepSpeed ZeRO-3 call it
    on every rank: the partitioned tensors are gathered collectively first.

    Raises:
        ValueError: ``model`` holds no adapter.
    """
    if not is_injected(model):
        raise ValueError(f"{type(model).__name__} holds no adapter to save; inject a method first (inject(model, "
                         "LoRA(r=8))), or save the model that holds the adapters.")
    directory = Path(path)
    state = adapter_state_dict(model)  # under ZeRO-3 a gather, so every rank takes part
    if is_nonzero_rank():
        return directory  # rank 0 writes
    tensors = {name: tensor.contiguous().clone() for name, tensor in state.items()}
    return write_adapter_directory(directory, tensors, checkpoint_metadata(model))


def write_adapter_directory(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write an adapter directory in the native format: ``tensors`` as safetensors, ``meta`` (methods, base shapes)
    as JSON with this format's version; returns ``directory``. The write is atomic: a failed save leaves the adapter
    the directory held before (see :func:`~lightning_peft.adapter_files.disk.write_adapter_files`); both files get
    the same fresh ``save_id``."""
    save_id = uuid.uuid4().hex
    return write_adapter_files(directory, tensors, {**meta, "format_version": FORMAT_VERSION, "save_id": save_id},
                               {**NATIVE_TENSOR_METADATA, "save_id": save_id})


def check_save_id(directory: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`AdapterStateError` if the two files of ``directory`` come from different saves.

    A save replaces the tensors first, so an interrupted one leaves tensors whose id the config lacks (it holds
    another id, or none). Tensors without an id (edited with a plain ``safetensors.torch.save_file``) pass.
    """
    config_id, tensors_id = meta.get("save_id"), read_tensor_metadata(directory).get("save_id")
    if tensors_id is not None and config_id != tensors_id:
        raise AdapterStateError(
            f"{directory / WEIGHTS_NAME} (save {tensors_id}) and {directory / CONFIG_NAME} (save {config_id}) come "
            "from different saves: a save was interrupted between replacing the two files. Save the adapter again, "
            "or restore both files from one copy."
        )


def load_native(model: nn.Module, directory: Path, strict_base: bool = False) -> nn.Module:
    """Load a native adapter directory into ``model``, injecting its methods first if ``model`` has none.

    All or nothing: when it fails, ``model`` is left as it was.

    Raises:
        BaseModelMismatchError: ``model`` is not the base model the adapter was saved from.
        AdapterStateError: The config is newer or not ours, the two files come from different saves (an interrupted
            save), or the tensors do not fit (see
            :func:`~lightning_peft.state.load_adapter_state_dict`).
    """
    meta = read_config(directory)
    check_metadata(meta, str(directory))
    check_save_id(directory, meta)
    return load_recorded_adapter(model, meta, read_tensors(directory), str(directory), strict_base)


def check_metadata(meta: dict[str, Any], source: str) -> None:
    """Raise :class:`AdapterStateError` unless ``meta`` is native adapter metadata this release reads."""
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterStateError(
            f"{source} uses adapter format {meta['format_version']}; this lightning_peft reads up to "
            f"{FORMAT_VERSION}. Upgrade lightning_peft."
        )
    for key in ("methods", "base_shapes"):
        if not isinstance(meta.get(key), (list, dict)):
            raise AdapterStateError(f"{source} has no {key!r} in its config: it was not written by save_adapter.")


def load_recorded_adapter(
    model: nn.Module, meta: dict[str, Any], state: dict[str, torch.Tensor], source: str, strict_base: bool = False
) -> nn.Module:
    """Inject the methods ``meta`` records (unless ``model`` holds adapters already) and load ``state``.

    The one loading path of native directories and Lightning checkpoints; all or nothing. Base weights other than
    those the adapter was trained on (its fingerprint) warn, or raise with ``strict_base``.
    """
    check_base_shapes(model, meta["base_shapes"], source)
    pissa = any(m.get("init") == "pissa" for m in meta["methods"])  # PiSSA changes base weights when injected
    with restored_on_error(model, values=pissa and not is_injected(model)):
        if not is_injected(model):
            inject(model, *[cast(Method, MethodConfig.from_dict(m)) for m in meta["methods"]])  # registered configs
        mismatch = fingerprint_mismatch(model, meta.get("base_fingerprint"), source)  # after PiSSA's residual
        if mismatch and strict_base:
            raise BaseModelMismatchError(mismatch)
        if mismatch:
            warnings.warn(f"{mismatch} (load_adapter(..., strict_base=True) refuses such a load.)", PEFTWarning,
                          stacklevel=3)
        return load_adapter_state_dict(model, state, source=source)  # values checked there, once

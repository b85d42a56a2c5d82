"""The two files of an adapter directory: written atomically, read with errors that name the file and the fix.

Both formats (native and Hugging Face PEFT's) store ``adapter_config.json`` beside ``adapter_model.safetensors``.
A save writes both to temporary files in the same folder (flushed to disk), then renames them over the old pair;
if the second rename fails, the first file is put back from a hard-link backup, so a failed save leaves the
previous adapter loadable and unchanged, and no temporary file behind. Loading never executes code.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lightning_peft.adapter_files.constants import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME
from lightning_peft.errors import AdapterStateError


def write_adapter_files(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], tensor_metadata: dict[str, str],
    sort_keys: bool = False,
) -> Path:
    """Write ``tensors`` (safetensors, with ``tensor_metadata``) and ``config`` (JSON) into ``directory`` atomically.

    Returns ``directory``. On any error the directory holds what it held before (an older adapter stays intact).
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights, config_file = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    with _temporary(directory, WEIGHTS_NAME) as new_weights, _temporary(directory, CONFIG_NAME) as new_config:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(new_weights), metadata=tensor_metadata)
        _flush(new_weights)
        new_config.write_text(json.dumps(config, indent=2, sort_keys=sort_keys))
        _flush(new_config)
        with _temporary(directory, WEIGHTS_NAME + ".old") as backup:
            had_weights = weights.is_file()
            if had_weights:
                os.link(weights, backup)  # the old tensors stay reachable until the config is in place
            os.replace(new_weights, weights)
            try:
                os.replace(new_config, config_file)
            except BaseException:
                if had_weights:
                    os.replace(backup, weights)
                else:
                    weights.unlink(missing_ok=True)
                raise
    return directory


@contextlib.contextmanager
def _temporary(directory: Path, name: str) -> Iterator[Path]:
    """A fresh temporary path beside ``name`` in ``directory``, removed on exit if it still exists."""
    handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    os.unlink(path)  # only the unique name is needed; os.link needs it absent
    try:
        yield Path(path)
    finally:
        Path(path).unlink(missing_ok=True)


def _flush(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def read_config(directory: Path) -> dict[str, Any]:
    """The JSON config of an adapter directory.

    Raises:
        FileNotFoundError: There is no config (the message says what the folder holds instead).
        AdapterStateError: The file is not valid JSON (truncated or edited); the message names it.
    """
    path = directory / CONFIG_NAME
    if not path.is_file():
        _refuse_missing(directory, path)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterStateError(
            f"{path} is not valid JSON ({error}); the file is truncated or was edited. Save the adapter again, or "
            "restore the file from a copy."
        ) from None
    if not isinstance(config, dict):
        raise AdapterStateError(f"{path} holds a JSON {type(config).__name__}, not an adapter config object.")
    return config


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory's safetensors file (never a pickle).

    Raises:
        FileNotFoundError: There is no safetensors file (a ``.bin``-only folder is explained).
        AdapterStateError: The file is corrupt or truncated; the message names it.
    """
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        _refuse_missing(directory, path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterStateError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt. Save the adapter "
            "again, or restore the file from a copy."
        ) from None


def read_tensor_metadata(directory: Path) -> dict[str, str]:
    """The header metadata of an adapter directory's safetensors file (``{}`` when it has none).

    Raises:
        FileNotFoundError: There is no safetensors file.
        AdapterStateError: The file is corrupt or truncated; the message names it.
    """
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        _refuse_missing(directory, path)
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterStateError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt. Save the adapter "
            "again, or restore the file from a copy."
        ) from None


def _refuse_missing(directory: Path, path: Path) -> None:
    pickles = [name for name in PICKLE_NAMES if (directory / name).is_file()]
    if pickles:
        raise FileNotFoundError(
            f"{directory} holds {', '.join(pickles)} but no {WEIGHTS_NAME}: lightning_peft refuses pickle files on "
            "purpose, because unpickling can run code. Convert it where you trust it, e.g. "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{directory / WEIGHTS_NAME}')`, or load it with peft and call save_pretrained() (safetensors by default)."
        )
    what = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None
    raise FileNotFoundError(
        f"{path} does not exist; "
        + (f"{directory} holds {what[:8]}. " if what is not None else f"there is no folder {directory}. ")
        + "Pass the folder save_adapter() (or peft's save_pretrained) wrote, or a Lightning checkpoint saved with "
        "adapters (a .ckpt file)."
    )

"""Adapter files: the native format and Hugging Face PEFT's, written atomically and read without running code.

The room above the in-memory modules (:mod:`lightning_peft.tensors` collects adapter tensors,
:mod:`lightning_peft.state` checks and copies them); nothing below imports from here.

* :mod:`~lightning_peft.adapter_files.constants`: file names, format versions, the checkpoint key.
* :mod:`~lightning_peft.adapter_files.disk`: the two files of a directory, written atomically, read with errors that
  name the file and the fix.
* :mod:`~lightning_peft.adapter_files.native`: our format (methods and base shapes recorded; loading injects).
* :mod:`~lightning_peft.adapter_files.peft_keys`, :mod:`~lightning_peft.adapter_files.peft_save`,
  :mod:`~lightning_peft.adapter_files.peft_load`: PEFT's layout, its key names chosen by layer class, both ways.
* :mod:`~lightning_peft.adapter_files.dispatch`: :func:`save_adapter` and :func:`load_adapter` for both formats.
* :mod:`~lightning_peft.adapter_files.export`: a Lightning checkpoint's adapter as a directory
  (``lightning-peft-export``).
"""

from lightning_peft.adapter_files.constants import CONFIG_NAME, FORMAT_VERSION, PEFT_VERSION, WEIGHTS_NAME
from lightning_peft.adapter_files.dispatch import load_adapter, save_adapter
from lightning_peft.adapter_files.native import checkpoint_metadata, write_adapter_directory
from lightning_peft.adapter_files.peft_load import is_peft_directory, load_peft
from lightning_peft.adapter_files.peft_save import save_peft

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "PEFT_VERSION",
    "WEIGHTS_NAME",
    "checkpoint_metadata",
    "is_peft_directory",
    "load_adapter",
    "load_peft",
    "save_adapter",
    "save_peft",
    "write_adapter_directory",
]

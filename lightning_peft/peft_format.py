"""Deprecated: moved to :mod:`lightning_peft.adapter_files` (``peft_save``, ``peft_load``); importing this warns.

Use ``lightning_peft.save_adapter(model, path, format="peft")`` and ``lightning_peft.load_adapter``, or
``lightning_peft.adapter_files.save_peft``/``load_peft``/``is_peft_directory``.
"""

import warnings

from lightning_peft.adapter_files.constants import PEFT_PREFIX as PREFIX
from lightning_peft.adapter_files.constants import PEFT_VERSION
from lightning_peft.adapter_files.peft_load import is_peft_directory, load_peft
from lightning_peft.adapter_files.peft_save import save_peft
from lightning_peft.errors import PEFTDeprecationWarning

warnings.warn("lightning_peft.peft_format moved to lightning_peft.adapter_files: import save_peft, load_peft and "
              "is_peft_directory from there (or call lightning_peft.save_adapter(..., format='peft')).",
              PEFTDeprecationWarning, stacklevel=2)

__all__ = ["PEFT_VERSION", "PREFIX", "is_peft_directory", "load_peft", "save_peft"]

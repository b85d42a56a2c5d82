"""Deprecated: moved to :mod:`lightning_peft.adapter_files.export`; importing this warns.

``python -m lightning_peft.export`` still runs the exporter (``lightning-peft-export`` is the same command).
"""

import sys
import warnings

from lightning_peft.adapter_files.checkpoint import adapter_from_checkpoint, read_checkpoint, read_deepspeed_checkpoint
from lightning_peft.adapter_files.export import export, load_base, main
from lightning_peft.errors import PEFTDeprecationWarning

warnings.warn("lightning_peft.export moved to lightning_peft.adapter_files.export; import from there, and run "
              "`lightning-peft-export` or `python -m lightning_peft.adapter_files.export`.", PEFTDeprecationWarning,
              stacklevel=2)

__all__ = ["adapter_from_checkpoint", "export", "load_base", "main", "read_checkpoint", "read_deepspeed_checkpoint"]

if __name__ == "__main__":
    sys.exit(main())

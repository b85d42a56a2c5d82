"""Deprecated location of the prefix adapters: they moved to :mod:`lightning_peft.prefix.attention`."""

import warnings

from lightning_peft.errors import PEFTDeprecationWarning
from lightning_peft.prefix.attention import *  # noqa: F403  (the names users imported from here)
from lightning_peft.prefix.attention import __all__  # noqa: F401

warnings.warn("lightning_peft.attention moved to lightning_peft.prefix.attention (register_attention_handler is also "
              "at the top level: lightning_peft.register_attention_handler).", PEFTDeprecationWarning, stacklevel=2)

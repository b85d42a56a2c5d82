"""lightning_peft: LoRA, prefix tuning and soft prompts for any torch model, as Lightning callbacks and a mixin."""

from lightning_peft.callbacks import LoRA
from lightning_peft.core import (
    Adapter,
    adapters,
    disable_adapters,
    inject,
    merge,
    merge_and_unload,
    trainable_summary,
    unload,
    unmerge,
)
from lightning_peft.errors import AdapterStateError, BaseModelMismatchError, PEFTWarning, TargetNotFoundError
from lightning_peft.lora import LoRAConfig, register_lora_layer
from lightning_peft.mixin import PEFTMixin
from lightning_peft.state import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterStateError",
    "BaseModelMismatchError",
    "LoRA",
    "LoRAConfig",
    "PEFTMixin",
    "PEFTWarning",
    "TargetNotFoundError",
    "adapter_state_dict",
    "adapters",
    "disable_adapters",
    "inject",
    "load_adapter",
    "load_adapter_state_dict",
    "merge",
    "merge_and_unload",
    "register_lora_layer",
    "save_adapter",
    "trainable_summary",
    "unload",
    "unmerge",
]

"""lightning_peft: LoRA, prefix tuning and soft prompts for any torch model, as Lightning callbacks and a mixin."""

import importlib
from typing import TYPE_CHECKING, Any

from lightning_peft.adapter import Adapter, adapters
from lightning_peft.adapter_files import load_adapter, save_adapter
from lightning_peft.distributed import fsdp_auto_wrap_policy, restore_fsdp1_parameters
from lightning_peft.errors import (
    AdapterStateError,
    BaseModelMismatchError,
    ParticipationError,
    PEFTWarning,
    TargetNotFoundError,
)
from lightning_peft.guard import participation_check
from lightning_peft.injection import inject
from lightning_peft.lora import LoRAConfig, register_lora_layer, register_weight_reader
from lightning_peft.lora.dora import reset_dora_magnitude
from lightning_peft.lora.per_sample import adapter_parameters, per_sample_adapters
from lightning_peft.lora.plus import param_groups
from lightning_peft.lora.weighted import add_weighted_adapter
from lightning_peft.named import (
    active_adapter,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_adapter,
)
from lightning_peft.operations import (
    adapters_disabled,
    enable_input_grads,
    merge,
    merge_and_unload,
    trainable_summary,
    unload,
    unmerge,
)
from lightning_peft.prefix import PrefixTuningConfig, fold_prefix, register_attention_handler
from lightning_peft.prompt import PromptTuningConfig, register_vit_locator
from lightning_peft.state import load_adapter_state_dict
from lightning_peft.tensors import adapter_state_dict

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them on first use
    from lightning_peft.callbacks import LoRA, PrefixTuning, PromptTuning
    from lightning_peft.glue.reload import load_from_checkpoint
    from lightning_peft.mixin import PEFTMixin

__version__ = "0.1.0"

# The Lightning glue loads on first use: importing lightning (and through torchmetrics, transformers and
# torchvision) costs seconds, and plain-PyTorch users of the core never need it.
_GLUE = {"LoRA": "lightning_peft.callbacks", "PrefixTuning": "lightning_peft.callbacks",
         "PEFTMixin": "lightning_peft.mixin", "PromptTuning": "lightning_peft.callbacks",
         "load_from_checkpoint": "lightning_peft.glue.reload"}


def __getattr__(name: str) -> Any:
    if name in _GLUE:
        return getattr(importlib.import_module(_GLUE[name]), name)
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")


__all__ = [
    "Adapter",
    "AdapterStateError",
    "BaseModelMismatchError",
    "LoRA",
    "LoRAConfig",
    "PEFTMixin",
    "PEFTWarning",
    "ParticipationError",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PromptTuning",
    "PromptTuningConfig",
    "TargetNotFoundError",
    "active_adapter",
    "add_adapter",
    "add_weighted_adapter",
    "adapter_parameters",
    "adapter_state_dict",
    "adapters",
    "adapters_disabled",
    "delete_adapter",
    "enable_input_grads",
    "fold_prefix",
    "fsdp_auto_wrap_policy",
    "inject",
    "list_adapters",
    "load_adapter",
    "load_adapter_state_dict",
    "load_from_checkpoint",
    "merge",
    "merge_and_unload",
    "param_groups",
    "participation_check",
    "per_sample_adapters",
    "register_attention_handler",
    "register_lora_layer",
    "register_vit_locator",
    "register_weight_reader",
    "reset_dora_magnitude",
    "restore_fsdp1_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_summary",
    "unload",
    "unmerge",
]

"""A named adapter read as plain LoRA layers, for operations on several adapters at once (weighted merging,
per-sample adapters): one set of refusals, each naming the operation that needs it."""

from __future__ import annotations

from torch import nn

from lightning_peft.lora.config import LoRAConfig
from lightning_peft.lora.layers import LoRALayer
from lightning_peft.methods import MethodConfig
from lightning_peft.named import adapter_parts


def plain_lora_layers(model: nn.Module, name: str, operation: str) -> tuple[dict[str, LoRALayer], list[LoRAConfig]]:
    """The LoRA layers of the named adapter ``name`` (active or parked) by layer name, and its configurations.

    Raises:
        ValueError: ``name`` holds another method, is DoRA (its weight is ``m · (W + ΔW) / ‖W + ΔW‖``, not
            ``W + ΔW``), trains base tensors (``trainable_modules``, ``bias``), or adapts a parameter rather than a
            layer (``target_parameters``); the message names ``operation``.
        KeyError: No adapter has that name.
    """
    layers, methods, marks = adapter_parts(model, name)
    configs: list[LoRAConfig] = []
    for method in methods:
        config = MethodConfig.from_dict(method.to_dict())
        if not isinstance(config, LoRAConfig):
            raise ValueError(f"adapter {name!r} holds {config.label} adapters; {operation} takes LoRA adapters only "
                             "(prefixes and prompts change the sequence and activations, not weights).")
        if config.dora:
            raise ValueError(f"adapter {name!r} is DoRA (dora=True): its weight is m · (W + ΔW) / ‖W + ΔW‖, not "
                             f"W + ΔW, which {operation} does not compute; use plain LoRA adapters.")
        configs.append(config)
    if marks:
        trained = [f"{type(module).__name__}.{local}" for module, locals_ in marks for local in sorted(locals_)]
        raise ValueError(f"adapter {name!r} also trains base tensors ({', '.join(trained[:3])}; trainable_modules, "
                         f"bias or batchnorm='update'), which every adapter shares; {operation} takes adapters "
                         "without them.")
    found: dict[str, LoRALayer] = {}
    for layer, adapter in layers:
        if not isinstance(adapter, LoRALayer):
            raise ValueError(f"adapter {name!r} adapts {layer!r} with {type(adapter).__name__} (target_parameters); "
                             f"{operation} takes LoRA layers only.")
        found[layer] = adapter
    return found, configs

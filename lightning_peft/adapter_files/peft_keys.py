"""How our LoRA tensors are named in Hugging Face PEFT's files, chosen by the layer's class.

``PEFT_LORA_KEYS`` maps each LoRA layer class to the function naming its tensors in PEFT's layout (or refusing the
layer, naming why). A layer takes the entry of the most specific class it is an instance of, so subclasses (a user's
``LoRALinear`` subclass registered with :func:`~lightning_peft.register_lora_layer`) inherit their parent's
layout; a LoRA layer with no entry is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import cast

import torch

from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.conv import LoRAConv
from lightning_peft.lora.dora import DoRALayer
from lightning_peft.lora.layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear

KeyMap = Callable[[str, LoRALayer], dict[str, str]]

MHA_BUG = (
    "LoRA on nn.MultiheadAttention {name!r}: PEFT 0.21 adds the out_proj update twice (its merge-for-forward adds "
    "the delta and then merges the out_proj LoRA again), so PEFT would compute something else from the same file."
)

LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB])"
                      r"|(?P<magnitude>lora_magnitude_vector))$")
"""A PEFT LoRA tensor name (after ``base_model.model.``): the module, and which of A, B and DoRA's magnitude it is."""


def _weights(name: str, layer: LoRALayer) -> dict[str, str]:
    return {"lora_A": f"{name}.lora_A.weight", "lora_B": f"{name}.lora_B.weight"}


def _conv(name: str, layer: LoRALayer) -> dict[str, str]:
    conv = cast(LoRAConv, layer)  # PEFT_LORA_KEYS calls it for LoRAConv layers only
    base = conv.base_layer
    problems = []
    if base.groups != 1 and conv.shared_over_groups:
        problems.append(f"groups={base.groups} with conv_groups='shared' (one B A shared by all groups; PEFT's "
                        "grouped-conv LoRA is an ungrouped A over all input channels and a grouped 1x1 B)")
    elif base.groups != 1:
        problems.append(f"groups={base.groups} (our per-group A is a grouped conv, PEFT's an ungrouped one over "
                        "all input channels, and PEFT cannot merge grouped convs)")
    if any(d != 1 for d in base.dilation):
        problems.append(f"dilation={base.dilation} (PEFT's A conv drops dilation)")
    if base.padding_mode != "zeros":
        problems.append(f"padding_mode={base.padding_mode!r} (PEFT's A conv pads with zeros)")
    if problems:
        raise ValueError(
            f"LoRA on {name!r} has no PEFT equivalent: {'; '.join(problems)}. Leave the layer out "
            "(exclude_modules) before training for PEFT, or save with format='native'."
        )
    return _weights(name, layer)


def _embedding(name: str, layer: LoRALayer) -> dict[str, str]:
    return {"lora_A": f"{name}.lora_embedding_A", "lora_B": f"{name}.lora_embedding_B"}


def _multihead_attention(name: str, layer: LoRALayer) -> dict[str, str]:
    raise ValueError(MHA_BUG.format(name=name) + " Save with format='native', or leave the layer out.")


PEFT_LORA_KEYS: dict[type[LoRALayer], KeyMap] = {
    LoRALinear: _weights,  # LoRAConv1D (transformers' Conv1D) is a LoRALinear and stores the same way
    LoRAConv: _conv,
    LoRAEmbedding: _embedding,
    LoRAMultiheadAttention: _multihead_attention,
}


def peft_lora_keys(name: str, layer: LoRALayer) -> dict[str, str]:
    """Our tensor names on ``layer`` → PEFT's keys (without ``base_model.model.``), by the layer's class.

    Raises:
        ValueError: PEFT computes something else for this layer (PiSSA, grouped/dilated convs, attention), or it is
            a layer type PEFT does not know; the message names the layer and the reason.

    Example:
        >>> from torch import nn
        >>> peft_lora_keys("fc", LoRALinear(nn.Linear(4, 4), r=2, alpha=2.0))
        {'lora_A': 'fc.lora_A.weight', 'lora_B': 'fc.lora_B.weight'}
    """
    if layer.pissa_applied:
        raise ValueError(
            f"LoRA layer {name!r} was initialised with PiSSA, which changed the base weights; PEFT would load it "
            "onto the original weights and compute something else. Save with format='native', or merge_and_unload()."
        )
    for cls in type(layer).__mro__:  # the most specific class with an entry wins
        keys = PEFT_LORA_KEYS.get(cls)
        if keys is not None:
            dora = {"lora_magnitude": f"{name}.lora_magnitude_vector"} if isinstance(layer, DoRALayer) else {}
            return {**keys(name, layer), **dora}
    raise ValueError(
        f"LoRA layer {name!r} is a {type(layer).__name__}, a layer type PEFT does not know; save with format='native'."
    )


def peft_parameter_keys(name: str, parameters: list[str]) -> dict[str, str]:
    """Our names of the ``target_parameters`` factors of the module ``name`` → PEFT's keys.

    PEFT wraps the module once per parameter, in the order the module registered them, so the last one is outermost
    (``name.lora_A.weight``) and each earlier one sits one ``base_layer`` deeper.

    Example:
        >>> peft_parameter_keys("experts", ["gate_up_proj", "down_proj"])["lora_A.gate_up_proj"]
        'experts.base_layer.lora_A.weight'
    """
    keys = {}
    for depth, parameter in enumerate(reversed(parameters)):
        wrapper = name + ".base_layer" * depth
        for factor in ("lora_A", "lora_B"):
            keys[f"{factor}.{parameter}"] = f"{wrapper}.{factor}.weight"
    return keys


def experts_to_peft(factor: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our per-expert factor in PEFT's layout: A ``(experts, r, in)`` → ``(experts·r, in)`` (expert-major rows), B
    ``(experts, out, r)`` → ``(out, r·experts)`` (expert-minor columns, as PEFT's ``lora_B`` reshapes it)."""
    if factor == "A":
        return tensor.reshape(-1, tensor.shape[-1])
    experts, out, r = tensor.shape
    return tensor.permute(1, 2, 0).reshape(out, r * experts)


def experts_from_peft(factor: str, tensor: torch.Tensor, experts: int) -> torch.Tensor:
    """The inverse of :func:`experts_to_peft` for a parameter of ``experts`` experts."""
    if factor == "A":
        return tensor.reshape(experts, -1, tensor.shape[-1])
    out = tensor.shape[0]
    return tensor.reshape(out, -1, experts).permute(2, 0, 1)


def magnitude_to_peft(layer: LoRALayer, magnitude: torch.Tensor) -> torch.Tensor:
    """Our DoRA magnitude ``(out,)`` in PEFT's layout: ``(1, out, 1, ...)`` for convolutions, else as it is."""
    if isinstance(layer, LoRAConv):
        return magnitude.reshape(1, -1, *([1] * (len(layer.weight_shape) - 2)))
    return magnitude


def is_conv1d(layer: LoRALayer) -> bool:
    """Whether ``layer`` adapts transformers' ``Conv1D`` (weights stored transposed: PEFT's ``fan_in_fan_out``)."""
    return isinstance(layer, LoRAConv1D)

"""LoRA (Hu et al. 2021): low-rank updates of any linear, convolution, embedding or attention layer, and of
parameters a module reads itself (MoE experts).

* :mod:`~lightning_peft.lora.config`: :class:`LoRAConfig` (the callback ``LoRA`` takes the same arguments), the
  registry of layer types and the selection of layers and parameters;
* :mod:`~lightning_peft.lora.layers`: the adapter base and the Linear, Conv1D and Embedding adapters (the formula);
* :mod:`~lightning_peft.lora.conv`, :mod:`~lightning_peft.lora.fused_conv`: convolutions, grouped and fused;
* :mod:`~lightning_peft.lora.dora`: DoRA (``dora=True``), the magnitude-and-direction form of each layer kind;
* :mod:`~lightning_peft.lora.attention`: ``nn.MultiheadAttention``;
* :mod:`~lightning_peft.lora.parameters`: ``target_parameters`` (3-D expert weights);
* :mod:`~lightning_peft.lora.readers`, :mod:`~lightning_peft.lora.tied`: layers whose parent reads the weight
  directly (Mamba's ``dt_proj``), and tied weights.
"""

from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.config import LoRAConfig, lora_layer_for, lora_layer_types, register_lora_layer
from lightning_peft.lora.conv import LoRAConv
from lightning_peft.lora.dora import DoRALayer
from lightning_peft.lora.layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear, lora_scale, pissa_factors
from lightning_peft.lora.parameters import LoRAParameters
from lightning_peft.lora.readers import register_weight_reader

__all__ = [
    "DoRALayer",
    "LoRAConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAParameters",
    "lora_layer_for",
    "lora_layer_types",
    "lora_scale",
    "pissa_factors",
    "register_lora_layer",
    "register_weight_reader",
]

"""Layers whose parent reads their weight directly instead of calling them, and so would bypass a LoRA adapter.

transformers' Mamba mixers pass ``self.dt_proj.weight`` and ``self.conv1d.weight`` to their scan and convolution
functions (and, on the ``mamba_ssm`` kernel path, ``x_proj.weight`` and ``out_proj.weight`` to ``mamba_inner_fn``):
an adapter's ``forward`` never runs there. A LoRA adapter on such a layer is built with ``read_directly=True`` and
then answers ``.weight`` with the weight it computes with, ``W + scale · B A`` (while enabled and unmerged), so the
update applies, and trains, on every path (checked against transformers 5.24's ``modeling_*.py``):

=========================  ==============================================  ======================================
parent                     read directly on the torch path                 also on the kernel path
=========================  ==============================================  ======================================
``MambaMixer``             ``dt_proj``, ``conv1d``                         ``x_proj``, ``out_proj``
``FalconMambaMixer``       ``dt_proj``, ``conv1d``                         ``x_proj``, ``out_proj``
``JambaMambaMixer``        ``dt_proj``, ``conv1d``
``Mamba2Mixer`` and the    ``conv1d``                                      ``out_proj``
Bamba, NemotronH, Zamba2,
FalconH1 mixers
``ZambaMambaMixer``        ``conv1d``
=========================  ==============================================  ======================================

``in_proj`` is called as a module on every path. WavLM's attention passes its four projections' weights to
``F.multi_head_attention_forward``, LongCat-Flash's router its ``classifier.weight`` to ``F.linear`` and DAB-DETR's
attention map its ``k_linear.weight`` to ``F.conv2d``: read directly too. torchvision's Swin attention
(``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``) passes ``qkv.weight`` and ``proj.weight`` to
``shifted_window_attention``, so those two are read directly too, as timm's BEiT ``Attention``, ``EvaAttention`` and
Swin-V2 ``WindowAttention`` read ``qkv.weight`` (to add their separate q/v biases). Teach LoRA another such parent
with :func:`register_weight_reader`; a parent no one taught is caught by the participation check
(:mod:`lightning_peft.guard`).
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from lightning_peft.imported import imported_class

_MAMBA = frozenset({"conv1d", "x_proj", "dt_proj", "out_proj"})
_MAMBA2 = frozenset({"conv1d", "out_proj"})
#: (transformers module, class, children it reads the weight of); resolved only once transformers is imported
_TRANSFORMERS_READERS: list[tuple[str, str, frozenset[str]]] = [
    ("mamba", "MambaMixer", _MAMBA),
    ("falcon_mamba", "FalconMambaMixer", _MAMBA),
    ("jamba", "JambaMambaMixer", frozenset({"conv1d", "dt_proj"})),
    ("mamba2", "Mamba2Mixer", _MAMBA2),
    ("bamba", "BambaMixer", _MAMBA2),
    ("nemotron_h", "NemotronHMamba2Mixer", _MAMBA2),
    ("zamba2", "Zamba2MambaMixer", _MAMBA2),
    ("falcon_h1", "FalconH1Mixer", _MAMBA2),
    ("zamba", "ZambaMambaMixer", frozenset({"conv1d"})),
    # these pass the weights to F.multi_head_attention_forward / F.linear / F.conv2d themselves
    ("wavlm", "WavLMAttention", frozenset({"q_proj", "k_proj", "v_proj", "out_proj"})),
    ("longcat_flash", "LongcatFlashTopkRouter", frozenset({"classifier"})),
    ("dab_detr", "DabDetrMHAttentionMap", frozenset({"k_linear"})),
]
#: (torchvision or timm module, class, children it reads the weight of); resolved only once that is imported
_VISION_READERS: list[tuple[str, str, frozenset[str]]] = [
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention", frozenset({"qkv", "proj"})),
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2", frozenset({"qkv", "proj"})),
    ("timm.models.beit", "Attention", frozenset({"qkv"})),
    ("timm.models.eva", "EvaAttention", frozenset({"qkv"})),
    ("timm.models.swin_transformer_v2", "WindowAttention", frozenset({"qkv"})),
]
_READERS: list[tuple[type[nn.Module], frozenset[str]]] = []


def register_weight_reader(parent_type: type[nn.Module], children: Collection[str]) -> None:
    """Tell LoRA that ``parent_type`` reads the ``weight`` of these children directly instead of calling them.

    A LoRA adapter on such a child then answers ``.weight`` with ``W + scale · B A``, so the update applies.

    Example:
        >>> class Gate(nn.Module):  # reads proj.weight itself
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.proj = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x @ self.proj.weight.T
        >>> register_weight_reader(Gate, ["proj"])
        >>> read_directly(nn.Sequential(Gate()), "0.proj")
        True
    """
    _READERS.insert(0, (parent_type, frozenset(children)))


def weight_readers() -> list[tuple[type[nn.Module], frozenset[str]]]:
    """The registered readers, then those of transformers', torchvision's and timm's modules already imported
    (none is imported here)."""
    places = [(f"transformers.models.{name}.modeling_{name}", cls, kids) for name, cls, kids in _TRANSFORMERS_READERS]
    known = []
    for module_name, class_name, children in places + _VISION_READERS:
        cls = imported_class(module_name, class_name)
        if cls is not None:
            known.append((cls, children))
    return _READERS + known


def read_directly(model: nn.Module, name: str) -> bool:
    """Whether the parent of ``model.get_submodule(name)`` reads that layer's weight directly."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return any(isinstance(parent, cls) and child in children for cls, children in weight_readers())

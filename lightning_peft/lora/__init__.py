"""LoRA (Hu et al. 2021): the method's configuration, the layer registry and how layers are selected.

The adapters themselves are in :mod:`lightning_peft.lora.layers`; see its docstring for the formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from lightning_peft.adapter import Adapter, innermost
from lightning_peft.injection import replace_module
from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.conv import ConvGroups, ConvPath, LoRAConv
from lightning_peft.lora.layers import (
    LAYER_NAME,
    LoRAConv1D,
    LoRAEmbedding,
    LoRAInit,
    LoRALayer,
    LoRALinear,
    lora_scale,
    pissa_factors,
)
from lightning_peft.lora.readers import read_directly, register_weight_reader
from lightning_peft.lora.tied import tied_parameter_ids, untie
from lightning_peft.methods import (
    BatchNormMode,
    MethodConfig,
    check_choice,
    check_layer_indices,
    check_positive_int,
    init_seed,
)
from lightning_peft.targets import Targets, is_inside, matches, select_modules, transformers_conv1d_type
from lightning_peft.tensors import mark_trainable

__all__ = [
    "LoRAConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "lora_layer_for",
    "lora_layer_types",
    "lora_scale",
    "pissa_factors",
    "register_lora_layer",
    "register_weight_reader",
]

_REGISTRY: list[tuple[type[nn.Module], type[LoRALayer]]] = [
    (nn.MultiheadAttention, LoRAMultiheadAttention),
    (nn.Linear, LoRALinear),
    (nn.Conv1d, LoRAConv),
    (nn.Conv2d, LoRAConv),
    (nn.Conv3d, LoRAConv),
    (nn.Embedding, LoRAEmbedding),
]


def register_lora_layer(base_type: type[nn.Module], adapter: type[LoRALayer]) -> None:
    """Teach LoRA a new layer type (checked before the built-in ones; the first match wins)."""
    _REGISTRY.insert(0, (base_type, adapter))


def lora_layer_types() -> list[tuple[type[nn.Module], type[LoRALayer]]]:
    """The layer types LoRA adapts, in lookup order (transformers' ``Conv1D`` once transformers is imported)."""
    conv1d = transformers_conv1d_type()
    return _REGISTRY + ([(conv1d, LoRAConv1D)] if conv1d is not None else [])


def lora_layer_for(module: nn.Module) -> type[LoRALayer]:
    return next(adapter for base_type, adapter in lora_layer_types() if isinstance(module, base_type))


@dataclass(eq=False)
class LoRAConfig(MethodConfig):
    """Configuration of LoRA; ``LoRA`` (the callback) takes the same arguments.

    Args:
        r: Rank of every update (paper §4.1 uses 1-64; 8 is a common default).
        alpha: Scaling numerator; updates are multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: Dropout probability on the adapter's input (0 disables it).
        target_modules: Which layers to adapt (see :mod:`lightning_peft.targets`): names, dotted suffixes,
            a full-match regex string, class names, ``"all-linear"`` (default, output heads excluded) or ``"all-conv"``.
        exclude_modules: Layers to skip, same syntax; a layer is skipped if it or a parent matches.
        trainable_modules: Modules trained fully alongside the adapters (heads, norms) and saved with them.
        layers: Only adapt layers whose index is in this list (``encoder.layer.3.…`` has index 3).
        layers_pattern: Regex of the container name before the index (``"layer"``, ``"h"``); first integer otherwise.
        rank_pattern: Per-layer rank overrides, ``{rule: r}``; the first matching rule wins.
        alpha_pattern: Per-layer alpha overrides, ``{rule: alpha}``.
        rslora: Use rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` or ``"pissa"`` (SVD of W; W keeps the
            residual, recomputed identically whenever LoRA is injected into the same base weights).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (train the biases of adapted layers).
        batchnorm: Frozen BatchNorm layers either keep their running statistics (``"frozen"``, default: they
            normalise as in eval mode, also while training) or update them (``"update"``; the statistics are then
            saved with the adapter).
        seed: Base seed of the adapters' initialisation; each adapter derives its own from its name.
        conv_groups: LoRA on grouped and depthwise convolutions: ``"shared"`` (default: one low-rank update of the
            ``(out, in/groups·prod(k))`` weight matrix, any ``r``, exactly mergeable) or ``"per_group"`` (a rank
            ``r/groups`` update per group; ``r`` must be a multiple of ``groups``). See :class:`LoRAConv`.
        conv_path: How LoRA convolutions are computed, the same result on each (up to float rounding):
            ``"auto"`` (default: the fused ``[W; A]`` convolution on CPU in training where it pays,
            ``conv(x, W + s·BA)`` without gradients, on CUDA and for the shared grouped form, else the adapter
            path), ``"adapter"`` (three convolutions), ``"folded"`` (``conv(x, W + s·BA)``; no dropout) or
            ``"fused"`` (no dropout, per-group form, numeric padding, a frozen base weight). A forced path that
            cannot run raises at inject (or, for what only the input shows, at the call).
            See :mod:`lightning_peft.lora.conv`.

    Example:
        >>> from lightning_peft import inject
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> model = inject(model, LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"2": 1}))
        >>> [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]
        [('0.lora_A', (2, 3, 3, 3)), ('0.lora_B', (8, 2, 1, 1)), ('2.lora_A', (1, 8)), ('2.lora_B', (2, 1))]
    """

    method_name: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    trainable_modules: list[str] | None = None
    layers: list[int] | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    init: LoRAInit = "default"
    bias: Literal["none", "all", "lora_only"] = "none"
    batchnorm: BatchNormMode = "frozen"
    seed: int = 0
    conv_groups: ConvGroups = "shared"
    conv_path: ConvPath = "auto"  # files saved before it existed ran "auto": the default

    #: files saved before ``conv_groups`` existed hold per-group grouped-conv adapters
    defaults_of_old_files: ClassVar[dict[str, Any]] = {"conv_groups": "per_group"}

    def __post_init__(self) -> None:
        for name, rank in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            check_positive_int(f"LoRA {name}", rank)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1); got {self.dropout!r}.")
        for name, alpha in {"alpha": self.alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}
                            }.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
                raise ValueError(
                    f"LoRA {name} must be a positive finite number (updates are scaled by alpha / r; 0 makes a LoRA "
                    f"that never changes the model nor learns); got {alpha!r}. Use e.g. alpha=2 * r."
                )
        check_layer_indices("LoRA", self.layers)
        check_choice("init", self.init, LoRAInit)
        check_choice("bias", self.bias, Literal["none", "all", "lora_only"])
        check_choice("batchnorm", self.batchnorm, BatchNormMode)
        check_choice("conv_groups", self.conv_groups, ConvGroups)
        check_choice("conv_path", self.conv_path, ConvPath)

    def attach(self, model: nn.Module) -> None:
        """Wrap every selected layer in its LoRA adapter."""
        supported = tuple(base_type for base_type, _ in lora_layer_types())
        targets: Targets = self.target_modules
        selected = select_modules(
            model, targets, supported=supported, exclude=self.exclude_modules, layers=self.layers,
            layers_pattern=self.layers_pattern, method="LoRA",
        )
        tied = tied_parameter_ids(model)  # one walk; untie re-checks the few layers that hold one
        for name, module in _outermost(_lift_attention_projections(model, selected)):
            r = _pattern_value(self.rank_pattern, name, module, self.r)
            alpha = _pattern_value(self.alpha_pattern, name, module, self.alpha)
            adapter_cls = lora_layer_for(innermost(module))
            seed = init_seed(self.seed, name)
            if any(id(p) in tied for p in innermost(module)._parameters.values()):
                untie(model, name, innermost(module))
            conv = {"conv_groups": self.conv_groups, "conv_path": self.conv_path}
            extra: dict[str, Any] = conv if issubclass(adapter_cls, LoRAConv) else {}
            extra["read_directly"] = read_directly(model, name)  # Mamba's dt_proj: the parent reads .weight
            try:
                adapter = adapter_cls(module, r, alpha, self.dropout, self.rslora, self.init, seed, **extra)
            except ValueError as err:  # name the layer, and put its name into the suggested fix
                raise ValueError(f"LoRA cannot adapt {name!r}: {str(err).replace(LAYER_NAME, repr(name))}") from None
            replace_module(model, name, adapter)
            if self.bias == "lora_only":
                _mark_biases(module)
        if self.bias == "all":
            _mark_biases(model)


def _mark_biases(root: nn.Module) -> None:
    """Train and save every bias under ``root`` (``bias``, and ``in_proj_bias`` of ``nn.MultiheadAttention``)."""
    for module in root.modules():
        names = {n for n, p in module.named_parameters(recurse=False) if n == "bias" or n.endswith("_bias")}
        if names and not isinstance(module, Adapter):
            mark_trainable(module, names)


def _pattern_value(pattern: dict[str, Any], name: str, module: nn.Module, default: Any) -> Any:
    return next((value for rule, value in pattern.items() if matches([rule], name, module)), default)


def _lift_attention_projections(
    model: nn.Module, selected: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    # nn.MultiheadAttention reads out_proj.weight directly, so a LoRA on out_proj alone would be skipped:
    # adapt the whole attention module instead (its adapter covers in_proj and out_proj). An attention already
    # wrapped by another adapter (a prefix, which owns the forward) is adapted from outside that wrapper.
    lifted: dict[str, nn.Module] = {}
    for name, module in selected:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
            name, module = parent_name, parent
        while isinstance(module, nn.MultiheadAttention) or isinstance(innermost(module), nn.MultiheadAttention):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not (isinstance(parent, Adapter) and child == "base_layer"):
                break
            name, module = parent_name, parent
        lifted[name] = module
    return list(lifted.items())


def _outermost(selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    names = [n for n, _ in selected]
    return [(n, m) for n, m in selected if not is_inside(n, (p for p in names if p != n))]



"""The configuration of LoRA, the registry of layer types it adapts, and how it selects layers and parameters."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from lightning_peft.adapter import Adapter, innermost
from lightning_peft.errors import PEFTWarning
from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.conv import ConvGroups, ConvPath, LoRAConv
from lightning_peft.lora.dora import dora_layer_for
from lightning_peft.lora.layers import LoRAConv1D, LoRAEmbedding, LoRAInit, LoRALayer, LoRALinear
from lightning_peft.lora.parameters import LoRAParameters
from lightning_peft.lora.readers import read_directly
from lightning_peft.lora.tied import tied_parameter_ids, untie
from lightning_peft.methods import Site, TargetedConfig, check_choice, check_positive_int
from lightning_peft.targets import Targets, is_inside, matches, outermost, select_parameters, transformers_conv1d_type
from lightning_peft.tensors import mark_trainable

_REGISTRY: list[tuple[type[nn.Module], type[LoRALayer]]] = [
    (nn.MultiheadAttention, LoRAMultiheadAttention),
    (nn.Linear, LoRALinear),
    (nn.Conv1d, LoRAConv),
    (nn.Conv2d, LoRAConv),
    (nn.Conv3d, LoRAConv),
    (nn.Embedding, LoRAEmbedding),
]


def register_lora_layer(base_type: type[nn.Module], adapter: type[LoRALayer]) -> type[LoRALayer]:
    """Teach LoRA a new layer type: ``adapter`` (a :class:`LoRALayer` subclass) wraps modules of ``base_type``.

    Registrations are asked newest first, before the built-in ones; the first match wins (as for
    ``register_attention_handler`` and ``register_vit_locator``).

    Returns:
        ``adapter``.
    """
    _REGISTRY.insert(0, (base_type, adapter))
    return adapter


def lora_layer_types() -> list[tuple[type[nn.Module], type[LoRALayer]]]:
    """The layer types LoRA adapts, in lookup order (transformers' ``Conv1D`` once transformers is imported)."""
    conv1d = transformers_conv1d_type()
    return _REGISTRY + ([(conv1d, LoRAConv1D)] if conv1d is not None else [])


def lora_layer_for(module: nn.Module) -> type[LoRALayer]:
    return next(adapter for base_type, adapter in lora_layer_types() if isinstance(module, base_type))


@dataclass(frozen=True)
class LoRASite:
    """What LoRA decided for one layer: the adapter class, rank and alpha."""

    adapter: type[LoRALayer]
    r: int
    alpha: float
    tied: bool  # the layer shares a weight with another module (GPT-2's wte and lm_head)


@dataclass(frozen=True)
class ParameterSite:
    """What LoRA decided for a module whose parameters it adapts (``target_parameters``)."""

    names: list[str]
    r: int
    alpha: float


@dataclass(eq=False)
class LoRAConfig(TargetedConfig):
    """Configuration of LoRA; ``LoRA`` (the callback) takes the same arguments.

    Args:
        r: Rank of every update (paper §4.1 uses 1-64; 8 is a common default).
        alpha: Scaling numerator; updates are multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: Dropout probability on the adapter's input (0 disables it).
        rank_pattern: Per-layer rank overrides, ``{rule: r}``; the first matching rule wins.
        alpha_pattern: Per-layer alpha overrides, ``{rule: alpha}``.
        rslora: Use rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` or ``"pissa"`` (SVD of W; W keeps the
            residual, recomputed identically whenever LoRA is injected into the same base weights).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (train the biases of adapted layers).
        target_parameters: Parameters adapted directly, for weights a module reads itself rather than through an
            ``nn.Linear`` (the 3-D expert weights of transformers 5 MoE models: ``["experts.gate_up_proj",
            "experts.down_proj"]``): full names, dotted suffixes or a full-match regex, as PEFT's option of that name.
            Each expert gets its own rank-``r`` update (see :mod:`lightning_peft.lora.parameters`). Combine with
            ``target_modules`` (``"all-linear"`` also adapts attention), or pass ``target_modules=[]`` for the
            parameters alone.
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
        dora: DoRA (Liu et al. 2024): each adapted weight becomes ``m · (W + s·BA) / ‖W + s·BA‖`` with a trained
            magnitude ``m`` per output unit, initialised to ``‖W‖`` (see :mod:`lightning_peft.lora.dora`). Linear,
            transformers Conv1D, Embedding and Conv1d/2d/3d; not with ``init="pissa"``, ``target_parameters``,
            ``nn.MultiheadAttention`` or the ``"folded"``/``"fused"`` conv paths.
        target_modules: Which layers to adapt (see :mod:`lightning_peft.targets`); default ``"all-linear"`` (output
            heads excluded). The other selection fields (``exclude_modules``, ``layers``, ``layers_pattern``) and the
            fields every method has (``trainable_modules``, ``batchnorm``, ``seed``, ``adapter_dtype``) are
            keyword-only: see :class:`~lightning_peft.methods.TargetedConfig` and
            :class:`~lightning_peft.methods.MethodConfig`.

    Example:
        >>> from lightning_peft import inject
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> model = inject(model, LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={"2": 1}))
        >>> [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]
        [('0.lora_A', (2, 3, 3, 3)), ('0.lora_B', (8, 2, 1, 1)), ('2.lora_A', (1, 8)), ('2.lora_B', (2, 1))]
    """

    method_name: ClassVar[str] = "lora"
    label: ClassVar[str] = "LoRA"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    init: LoRAInit = "default"
    bias: Literal["none", "all", "lora_only"] = "none"
    conv_groups: ConvGroups = "shared"
    conv_path: ConvPath = "auto"
    target_parameters: list[str] | None = None
    dora: bool = False
    target_modules: Targets | None = field(default="all-linear", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        check_choice("init", self.init, LoRAInit)
        check_choice("bias", self.bias, Literal["none", "all", "lora_only"])
        check_choice("conv_groups", self.conv_groups, ConvGroups)
        check_choice("conv_path", self.conv_path, ConvPath)
        if self.dora:
            _check_dora(self)

    def sites(self, model: nn.Module) -> list[Site[LoRASite | ParameterSite]]:
        """Every selected layer LoRA can adapt (attention projections lifted to their attention module), then every
        module holding ``target_parameters``."""
        types = lora_layer_types()
        supported = tuple(base_type for base_type, _ in types)
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, supported)]
        selected = self.select(model, candidates, ", ".join(t.__name__ for t in supported))
        tied = tied_parameter_ids(model)  # one walk; untie re-checks the few layers that hold one
        sites: list[Site[LoRASite | ParameterSite]] = [
            Site(name, module, LoRASite(lora_layer_for(innermost(module)),
                                        _pattern_value(self.rank_pattern, name, module, self.r),
                                        _pattern_value(self.alpha_pattern, name, module, self.alpha),
                                        any(id(p) in tied for p in innermost(module)._parameters.values())))
            for name, module in outermost(_lift_attention_projections(model, selected))
        ]
        return sites + self._parameter_sites(model, [site.name for site in sites])

    def _parameter_sites(self, model: nn.Module, layers: list[str]) -> list[Site[LoRASite | ParameterSite]]:
        if not self.target_parameters:
            return []
        owners: dict[str, list[str]] = {}
        for owner, local in select_parameters(model, self.target_parameters):
            owners.setdefault(owner, []).append(local)
        sites: list[Site[LoRASite | ParameterSite]] = []
        for owner, names in owners.items():
            module = model.get_submodule(owner)
            clash = [n for n in layers if n == owner or is_inside(owner, [n]) or is_inside(n, [owner])]
            if clash or isinstance(module, Adapter):
                raise ValueError(
                    f"target_parameters selects {names} of {owner!r}, which target_modules also adapts "
                    f"({clash[:3] or owner!r}); one LoRA per weight. Leave it out of one of the two."
                )
            sites.append(Site(owner, module, ParameterSite(names, _pattern_value(self.rank_pattern, owner, module,
                                                                                   self.r),
                                                           _pattern_value(self.alpha_pattern, owner, module,
                                                                          self.alpha))))
        return sites

    def build(self, model: nn.Module, site: Site[LoRASite | ParameterSite], seed: int) -> Adapter:
        """Wrap the site's layer in its LoRA adapter (a tied weight gets its own copy first)."""
        if isinstance(site.detail, ParameterSite):
            if self.dropout:
                raise ValueError(
                    f"dropout={self.dropout} cannot apply to target_parameters (the update acts on the weights, so "
                    "there is no adapter input to drop); use dropout=0, or a second LoRA for the parameters."
                )
            return LoRAParameters(site.module, site.detail.names, site.detail.r, site.detail.alpha, self.rslora,
                                  self.init, seed)
        kind = dora_layer_for(site.detail.adapter, site.name) if self.dora else site.detail.adapter
        if site.detail.tied:
            untie(model, site.name, innermost(site.module))
        conv = {"conv_groups": self.conv_groups, "conv_path": self.conv_path}
        extra: dict[str, Any] = conv if issubclass(kind, LoRAConv) else {}
        extra["read_directly"] = read_directly(model, site.name)  # Mamba's dt_proj: the parent reads .weight
        adapter = kind(site.module, site.detail.r, site.detail.alpha, self.dropout, self.rslora,
                                      self.init, seed, **extra)
        if self.bias == "lora_only":
            _mark_biases(site.module)
        return adapter

    def finish(self, model: nn.Module, built: list[tuple[str, Adapter]]) -> None:
        if self.bias == "all":
            _mark_biases(model)
        _warn_larger_than_their_layers(built)


def _warn_larger_than_their_layers(built: list[tuple[str, Adapter]]) -> None:
    """Warn (:class:`PEFTWarning`) where an adapter trains more values than its layer holds: a rank ``r`` update
    of a small matrix (a depthwise 3x3 conv of 32 channels is a 32 x 9 matrix: 328 values at ``r=8``, the layer
    288) saves nothing there. Nothing is changed: the user picks the rank."""
    larger = []
    for name, adapter in built:
        if isinstance(adapter, LoRALayer):
            added = sum(p.numel() for n, p in adapter.named_parameters() if not n.startswith("base_layer."))
            own = sum(p.numel() for p in adapter.base_layer.parameters())
            if added > own:
                larger.append((name, adapter, added, own))
    if not larger:
        return
    name, adapter, added, own = larger[0]
    lower = max(1, own * adapter.r // added)  # an adapter's values grow linearly with its rank
    warnings.warn(
        f"LoRA trains more values than the layer it adapts holds in {len(larger)} of {len(built)} layers, e.g. "
        f"{name!r} ({type(innermost(adapter)).__name__}: rank {adapter.r} adds {added:,} values, the layer holds "
        f"{own:,}), so the low-rank update saves nothing there. Give such layers a lower rank "
        f"(rank_pattern={{{name!r}: {lower}}}) or train them fully (trainable_modules) instead.",
        PEFTWarning, stacklevel=4,
    )


def _check_dora(config: LoRAConfig) -> None:
    """Refuse, naming the option, what DoRA does not combine with (checked once, at construction)."""
    clashes = {"init='pissa'": config.init == "pissa", "target_parameters": bool(config.target_parameters),
               f"conv_path={config.conv_path!r}": config.conv_path not in ("auto", "adapter")}
    found = [name for name, clash in clashes.items() if clash]
    if found:
        raise ValueError(f"dora=True does not combine with {', '.join(found)}: DoRA needs the base weight W as it "
                         "is and a layer it wraps (its norm per output unit); conv_path must be 'auto' or 'adapter'. "
                         "Drop the option, or use dora=False.")


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

"""What a method is: the protocol ``inject`` accepts, the bases of method configurations, and their checks.

A method tells :func:`~lightning_peft.injection.inject` where its adapters go and builds them; inject owns the loop
(replace each site by its adapter, record it, mark what trains, freeze the rest)::

    for site in method.sites(model):                                  # where: selected by the method's rules
        adapter = method.build(model, site, init_seed(method.seed, site.name))
        replace_module(model, site.name, adapter)
    method.finish(model, built)                                       # what spans sites (a shared MLP, hooks)
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

from torch import nn

from lightning_peft.targets import Targets, outermost, select_modules

if TYPE_CHECKING:
    from lightning_peft.adapter import Adapter

#: What frozen BatchNorm layers do with their running statistics (every method's ``batchnorm`` argument).
BatchNormMode = Literal["frozen", "update"]
#: Dtype of adapter tensors (every method's ``adapter_dtype`` argument).
AdapterDtype = Literal["auto", "float32", "bfloat16", "float16"]
#: Placeholder for the adapted layer's name in errors raised while building; inject puts the real name in.
LAYER_NAME = "<layer name>"

Detail = TypeVar("Detail")


@dataclass(frozen=True)
class Site(Generic[Detail]):
    """Where one adapter goes: the module named ``name`` in the model, and what the method found out about it."""

    name: str
    module: nn.Module
    detail: Detail


@runtime_checkable
class Method(Protocol):
    """What ``inject`` accepts: a method configuration (``LoRAConfig``) or a callback holding one (``LoRA``)."""

    @property
    def batchnorm(self) -> BatchNormMode: ...  # read-only here, so a config's ``Literal`` field satisfies it

    @property
    def seed(self) -> int: ...

    @property
    def adapter_dtype(self) -> AdapterDtype: ...

    def sites(self, model: nn.Module) -> Sequence[Site[Any]]: ...

    def build(self, model: nn.Module, site: Site[Any], seed: int) -> Adapter: ...

    def finish(self, model: nn.Module, built: list[tuple[str, Adapter]]) -> None: ...

    def trainable_rules(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(eq=False)
class MethodConfig:
    """Base of method configurations: the fields every method has, keyword-only, and the steps inject asks for.

    Args:
        trainable_modules: Modules trained fully alongside the adapters (heads, norms) and saved with them.
        batchnorm: Frozen BatchNorm layers keep their running statistics (``"frozen"``, default: they normalise as
            in eval mode, also while training) or update them (``"update"``; the statistics are then saved with the
            adapter).
        seed: Base seed of the adapters' initialisation; each adapter derives its own from its name, so 1 and N
            processes (and resumed runs) start from the same weights.
        adapter_dtype: Dtype of the adapter tensors: ``"auto"`` follows the model (a bf16-true run trains bf16
            adapters), a dtype name pins them (``"float32"``: fp32 adapters on a bf16 or quantized base; inputs are
            cast at the adapter).
    """

    method_name: ClassVar[str] = "method"
    #: How error messages name the method ("LoRA", "prefix tuning").
    label: ClassVar[str] = "this method"
    registry: ClassVar[dict[str, type[MethodConfig]]] = {}

    trainable_modules: list[str] | None = field(default=None, kw_only=True)
    batchnorm: BatchNormMode = field(default="frozen", kw_only=True)
    seed: int = field(default=0, kw_only=True)
    adapter_dtype: AdapterDtype = field(default="auto", kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.registry.setdefault(cls.method_name, cls)  # the config class, not callbacks that reuse its name

    def __post_init__(self) -> None:
        check_choice("batchnorm", self.batchnorm, BatchNormMode)
        check_choice("adapter_dtype", self.adapter_dtype, AdapterDtype)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}.")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MethodConfig:
        """Rebuild a configuration saved by :meth:`to_dict` (``{"method": "lora", "r": 8, ...}``)."""
        fields = dict(config)
        name = fields.pop("method", None)
        if name not in cls.registry:
            raise ValueError(
                f"saved method {name!r} is unknown to this lightning_peft; it knows {sorted(cls.registry)}."
            )
        target = cls.registry[name]
        return target(**fields)

    def sites(self, model: nn.Module) -> Sequence[Site[Any]]:
        """Where this method's adapters go in ``model``, in module order (raises when it finds none)."""
        raise NotImplementedError

    def build(self, model: nn.Module, site: Site[Any], seed: int) -> Adapter:
        """The adapter for ``site``, initialised from ``seed``; inject puts it in the site's place."""
        raise NotImplementedError

    def finish(self, model: nn.Module, built: list[tuple[str, Adapter]]) -> None:
        """What spans the adapters just built (a shared encoder, hooks on the model); nothing by default."""

    def trainable_rules(self) -> list[str]:
        return list(self.trainable_modules or [])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description, stored in checkpoints and adapter files."""
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method_name, **fields}


@dataclass(eq=False)
class TargetedConfig(MethodConfig):
    """Base of methods that adapt modules selected by rules (see :mod:`lightning_peft.targets`).

    Args:
        target_modules: Which modules to adapt: names, dotted suffixes, a full-match regex string, module classes
            or class names, ``"all-linear"``/``"all-conv"``; ``None`` takes every module the method can adapt.
        exclude_modules: Modules to skip, same syntax; a module is skipped if it or a parent matches.
        layers: Only modules whose layer index is in this list (``encoder.layer.3.…`` has index 3).
        layers_pattern: Regex of the container name before the index (``"layer"``, ``"h"``); first integer otherwise.
    """

    target_modules: Targets | None = field(default=None, kw_only=True)
    exclude_modules: Targets | None = field(default=None, kw_only=True)
    layers: list[int] | None = field(default=None, kw_only=True)
    layers_pattern: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer_indices(self.label, self.layers)

    def select(
        self, model: nn.Module, candidates: Sequence[tuple[str, nn.Module]], kinds: str
    ) -> list[tuple[str, nn.Module]]:
        """The outermost of ``candidates`` (what the method can adapt, described by ``kinds``) that the rules select.

        Raises:
            TargetNotFoundError: The rules select nothing adaptable; the message names the closest candidates.
        """
        selected = select_modules(
            model, self.target_modules, candidates=candidates, kinds=kinds, exclude=self.exclude_modules,
            layers=self.layers, layers_pattern=self.layers_pattern, method=self.label,
        )
        return outermost(selected)


def _jsonable(value: Any) -> Any:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def check_choice(name: str, value: object, choices: Any) -> None:
    """Raise ``ValueError`` naming the allowed values when ``value`` is not one of the ``Literal`` ``choices``."""
    allowed = choices.__args__
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def check_positive_int(name: str, value: object, unit: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) of at least 1, naming ``unit``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{f' ({unit})' if unit else ''}; got {value!r}.")


def check_layer_indices(method: str, layers: object) -> None:
    """Raise ``ValueError`` unless ``layers`` is ``None`` or a non-empty list of layer indices (ints >= 0)."""
    if layers is None:
        return
    if not isinstance(layers, list) or not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                         for i in layers):
        raise ValueError(f"{method} layers must be a non-empty list of layer indices >= 0 (or None for every layer); "
                         f"got {layers!r}.")


def init_seed(seed: int, name: str) -> int:
    """A deterministic per-adapter seed, so 1 and N processes (and resumed runs) start from the same weights."""
    return zlib.crc32(f"{seed}:{name}".encode())

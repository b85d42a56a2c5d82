"""What a method is: the protocol ``inject`` accepts, the base of method configurations, and their checks."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from torch import nn

#: What frozen BatchNorm layers do with their running statistics (every method's ``batchnorm`` argument).
BatchNormMode = Literal["frozen", "update"]


@runtime_checkable
class Method(Protocol):
    """What ``inject`` accepts: a method configuration (``LoRAConfig``) or a callback holding one (``LoRA``)."""

    def attach(self, model: nn.Module) -> None: ...

    @property
    def batchnorm(self) -> BatchNormMode: ...  # read-only here, so a config's ``Literal`` field satisfies it

    def trainable_rules(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(eq=False)
class MethodConfig:
    """Base of method configurations. Subclasses add typed fields and implement :meth:`attach`."""

    method_name: ClassVar[str] = "method"
    registry: ClassVar[dict[str, type[MethodConfig]]] = {}
    #: Values of fields that files saved before the field existed lack (the behaviour those files were made with).
    defaults_of_old_files: ClassVar[dict[str, Any]] = {}
    #: Dtype of the adapter tensors: ``"auto"`` follows the model (a bf16-true run trains bf16 adapters), a dtype
    #: name pins them (``"float32"``: fp32 adapters on a bf16 or quantized base; inputs are cast at the adapter).
    adapter_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.registry.setdefault(cls.method_name, cls)  # the config class, not callbacks that reuse its name

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
        return target(**{**target.defaults_of_old_files, **fields})

    def attach(self, model: nn.Module) -> None:
        """Add this method's adapters to ``model`` in place."""
        raise NotImplementedError

    def trainable_rules(self) -> list[str]:
        return list(getattr(self, "trainable_modules", None) or [])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description, stored in checkpoints and adapter files."""
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method_name, **fields}


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

"""The one injection path every method shares, and the operations on adapted models.

``inject(model, method)`` asks the method to attach its adapters, marks what the user wants trained, and then
freezes everything else. Adapters are :class:`Adapter` modules; what they save and train is found from the
module tree itself (adapter parameters plus tensors marked on ``trainable_modules``), so any sub-tree of an
adapted model can be saved or loaded on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_peft.zero3 import global_shape, is_partitioned

_SAVED_TENSORS = "_peft_saved_tensors"  # attribute on a base module: local tensor names to train and save
_METHODS = "_peft_methods"  # attribute on the root passed to inject: the method configs applied, in order
_ORIGIN = "_peft_origin"  # attribute on an adapter: (position in the root's methods, method, name in that root)

#: What frozen BatchNorm layers do with their running statistics (every method's ``batchnorm`` argument).
BatchNormMode = Literal["frozen", "update"]


class Adapter(nn.Module):
    """Base class of every module lightning_peft adds to a model.

    An adapter owns its learnable tensors as plain ``nn.Parameter`` attributes. When it wraps a layer, the
    layer is its ``base_layer`` child and attribute reads it does not know (``weight``, ``in_features``) fall
    through to that layer, so code that inspects the layer keeps working.
    """

    mergeable: ClassVar[bool] = False
    #: Whether the adapter can be an FSDP1 wrap unit of its own (its tensors are used only inside its forward).
    fsdp_unit: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.merged = False

    def reset_parameters(self) -> None:
        """Restore the adapter's initial values, at which the adapted model equals the base model."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the adapter into the base weights (only for adapters with ``mergeable = True``)."""
        raise TypeError(f"{type(self).__name__} changes activations, not weights; it cannot be merged.")

    def unmerge(self) -> None:
        """Take a merged adapter back out of the base weights."""
        raise TypeError(f"{type(self).__name__} cannot be merged or unmerged.")

    def pin_dtype(self, dtype: torch.dtype) -> None:
        """Keep this adapter's floating-point tensors in ``dtype``, also through ``model.to(...)``/``.half()`` and
        precision plugins that convert the whole model (fp32 adapters on a bf16 base, for example)."""
        self._pinned_dtype = dtype
        self._apply(lambda t: t)

    def _apply(self, fn: Any, recurse: bool = True) -> Adapter:
        super()._apply(fn, recurse)
        dtype = self.__dict__.get("_pinned_dtype")
        if dtype is not None:
            for _, tensor in self.adapter_tensors():
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a plain base-model state dict names the wrapped layer's tensors without "base_layer.": route them there,
        # so loading base weights into an adapted model never drops them silently
        if "base_layer" in self._modules:
            own = set(self._parameters) | set(self._buffers) | set(self._modules)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                local = key[len(prefix):]
                if local.split(".")[0] not in own:
                    state_dict[f"{prefix}base_layer.{local}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def unwrap(self) -> nn.Module:
        """The module that replaces this adapter when adapters are unloaded."""
        return self._modules["base_layer"]  # type: ignore[return-value]

    def adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(local name, tensor)`` for every parameter and persistent buffer the adapter owns."""
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if not name.startswith("base_layer."):
                yield name, tensor

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)


def innermost(module: nn.Module) -> nn.Module:
    """The module under any chain of adapters wrapping it (a LoRA on an embedding, a prefix on an attention)."""
    while isinstance(module, Adapter):
        module = module.unwrap()
    return module


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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def mark_trainable(module: nn.Module, names: set[str] | None = None) -> None:
    """Mark local tensors of ``module`` (all of them by default) to be trained and saved with the adapter."""
    local = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    chosen = local if names is None else names & local
    module.__dict__[_SAVED_TENSORS] = marked(module) | chosen


def marked(module: nn.Module | None) -> frozenset[str]:
    """Local names of the tensors of ``module`` marked to train and save with the adapter (``trainable_modules``,
    ``batchnorm="update"``); empty for ``None``."""
    return module.__dict__.get(_SAVED_TENSORS, frozenset()) if module is not None else frozenset()


def inject(model: nn.Module, *methods: Method) -> nn.Module:
    """Add the adapters of ``methods`` to ``model`` in place, freeze the rest, and return ``model``.

    Args:
        model: Any ``nn.Module`` (a LightningModule too).
        methods: Method objects such as ``LoRA(r=8)``; several compose (each attaches its own adapters).

    Returns:
        ``model``, with only adapter parameters and ``trainable_modules`` left trainable.

    Raises:
        TargetNotFoundError: A method's targets or ``trainable_modules`` match nothing.

    Example:
        >>> from lightning_peft import LoRA
        >>> model = inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), LoRA(r=2, target_modules=["0"]))
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.lora_A', '0.lora_B']
    """
    for method in methods:
        if not isinstance(method, Method):
            raise TypeError(f"inject() takes method objects such as LoRA(r=8); got {type(method).__name__}.")
        existing = {id(adapter) for _, adapter in adapters(model)}
        method.attach(model)
        dtype = getattr(method, "adapter_dtype", "auto")
        position = len(model.__dict__.get(_METHODS, []))
        for name, adapter in adapters(model):
            if id(adapter) in existing:
                continue
            adapter.__dict__[_ORIGIN] = (position, method, clean_name(name))
            if "base_layer" in adapter._modules and adapter.fsdp_unit:
                adapter._modules["base_layer"].__dict__["_peft_is_base"] = True  # for fsdp_auto_wrap_policy
            if dtype != "auto":
                adapter.pin_dtype(getattr(torch, dtype))
        rules = method.trainable_rules()
        if rules:
            from lightning_peft.targets import select_names

            for name in select_names(model, rules, what="trainable_modules"):
                for sub in model.get_submodule(name).modules():
                    if not isinstance(sub, Adapter):
                        mark_trainable(sub)
        _configure_batchnorm(model, method.batchnorm)
        model.__dict__.setdefault(_METHODS, []).append(method)
    refresh_trainable(model)
    return model


def _configure_batchnorm(model: nn.Module, mode: BatchNormMode) -> None:
    """Frozen BatchNorm layers keep their statistics (``"frozen"``) or update and save them (``"update"``).

    With several methods, ``"update"`` wins: a later method's default ``"frozen"`` does not stop the statistics."""
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if module.weight is not None and "weight" in marked(module):
            continue  # a trainable norm (trainable_modules) trains as usual
        if mode == "update":
            mark_trainable(module, {"running_mean", "running_var", "num_batches_tracked"})
            if module.__dict__.pop("_peft_frozen_stats", False):
                _remove_peft_hooks(module)  # an earlier method froze them: its two statistics hooks go
        elif "running_mean" not in marked(module) and not module.__dict__.get("_peft_frozen_stats"):
            module.__dict__["_peft_frozen_stats"] = True
            add_peft_hook(module, module.register_forward_pre_hook(_use_running_stats))
            add_peft_hook(module, module.register_forward_hook(_restore_mode))


def _use_running_stats(module: nn.Module, args: Any) -> None:
    module.__dict__["_peft_was_training"] = module.training
    module.training = False  # normalise with running statistics and leave them unchanged


def _restore_mode(module: nn.Module, args: Any, output: Any) -> None:
    module.training = module.__dict__.pop("_peft_was_training", module.training)


def refresh_trainable(model: nn.Module) -> None:
    """Set ``requires_grad`` from the adapter tree: adapter parameters and marked tensors train, nothing else."""
    trainable = {id(p) for _, p in adapter_tensors(model, include_buffers=False)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def adapters(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """``(name, adapter)`` for every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


_WRAPPER_PARTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def is_inside(name: str, outers: Iterable[str]) -> bool:
    """Whether the module ``name`` lies below one of the modules ``outers`` (``""``, the root, holds them all)."""
    return any(outer == "" or name.startswith(f"{outer}.") for outer in outers)


def clean_name(name: str) -> str:
    """A tensor name without the wrapper parts FSDP, activation checkpointing and ``torch.compile`` insert
    (the names their state dicts use): ``"_fsdp_wrapped_module.layer.0"`` -> ``"layer.0"``."""
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


def adapter_tensors(model: nn.Module, include_buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(full name, tensor)`` for every tensor an adapter checkpoint holds: adapter tensors and marked ones, i.e.
    the model's parameters (and persistent buffers) whose names pass :func:`adapter_name_test`.

    Names are those of ``model.state_dict()``, without wrapper parts (see :func:`clean_name`)."""
    is_adapter_tensor = adapter_name_test(model)
    seen: set[int] = set()  # a tensor shared by two modules counts once, as in named_parameters()
    for name, module in model.named_modules():
        prefix = f"{clean_name(name)}." if clean_name(name) else ""
        tensors = list(module.named_parameters(recurse=False))
        if include_buffers:
            tensors += [(local, buffer) for local, buffer in module.named_buffers(recurse=False)
                        if local not in module._non_persistent_buffers_set]
        for local, tensor in tensors:
            if id(tensor) not in seen and is_adapter_tensor(prefix + local):
                seen.add(id(tensor))
                yield prefix + local, tensor


def adapter_name_test(model: nn.Module) -> Callable[[str], bool]:
    """Whether a ``model.state_dict()`` name is an adapter checkpoint's tensor, decided from names alone: the one
    rule behind :func:`adapter_tensors`, also for state dicts whose tensors the modules do not hold (FSDP1 with
    ``use_orig_params=False`` moves the parameters into flat ones; the module tree and the state dict's names stay).

    A name is an adapter tensor when its module marked it (``trainable_modules``), or when the nearest adapter above
    it does not hold it under ``base_layer``. FSDP1's flattened storage (``_flat_param``) is none.
    """
    modules = {clean_name(name): module for name, module in model.named_modules()}

    def test(name: str) -> bool:
        name = clean_name(name)  # a compiled submodule's state dict keeps "_orig_mod" in its names
        owner, _, local = name.rpartition(".")
        if local in marked(modules.get(owner)):
            return True
        if local == "_flat_param":
            return False
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # the nearest adapter above the tensor
            if isinstance(modules.get(".".join(parts[:depth])), Adapter):
                return parts[depth] != "base_layer"
        return False

    return test


def applied_methods(model: nn.Module) -> list[Method]:
    """The method objects injected into ``model`` (as the root passed to :func:`inject`), in order."""
    return list(model.__dict__.get(_METHODS, []))


def is_injected(model: nn.Module) -> bool:
    """Whether ``model`` holds any adapter."""
    return any(True for _ in adapters(model))


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter (LoRA) into its base weights, in place; returns ``model``.

    Adapters that change activations rather than weights (prompts, prefixes) stay active.

    Example:
        >>> from lightning_peft import LoRA
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> merge(model) is model
        True
    """
    _require_whole_weights(model, "merge")
    for _, adapter in adapters(model):
        if adapter.mergeable and not adapter.merged:
            adapter.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapter updates back out of the base weights, in place; returns ``model``.

    Example:
        >>> from lightning_peft import LoRA
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> unmerge(merge(model)) is model
        True
    """
    _require_whole_weights(model, "unmerge")
    for _, adapter in adapters(model):
        if adapter.mergeable and adapter.merged:
            adapter.unmerge()
    return model


def _require_whole_weights(model: nn.Module, action: str) -> None:
    if any(is_partitioned(p) for p in model.parameters()):
        raise ValueError(
            f"{action} changes whole base weights, but DeepSpeed ZeRO-3 holds only this rank's partition of them. "
            "Save the adapter (save_adapter on every rank, or lightning-peft-export of the checkpoint directory), "
            f"load it into the model outside DeepSpeed, and {action} there."
        )


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base modules back: no lightning_peft code is left in ``model``.

    Raises:
        TypeError: The model holds adapters that cannot be merged (prompts, prefixes); call :func:`unload`
            to drop them, or keep the adapted model.
    """
    blocking = [name for name, adapter in adapters(model) if not adapter.mergeable]
    if blocking:
        raise TypeError(
            f"merge_and_unload() cannot fold {', '.join(blocking[:5])} into weights: prompt and prefix adapters "
            "change activations. Keep the adapted model for inference, or call unload() to drop them."
        )
    merge(model)
    for _, adapter in adapters(model):
        adapter.merged = False  # the updates now belong to the base weights: unload() must not take them out
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging, restoring the base modules (trained updates are dropped)."""
    for name, adapter in reversed(list(adapters(model))):
        if adapter.merged:
            adapter.unmerge()
        base = adapter.unwrap()
        if name:
            replace_module(model, name, base)
        else:
            raise TypeError("unload() needs the model that holds the adapter, not the adapter itself.")
    for module in model.modules():
        module.__dict__.pop(_SAVED_TENSORS, None)
        module.__dict__.pop("_peft_frozen_stats", None)
        module.__dict__.pop("_peft_is_base", None)
        _remove_peft_hooks(module)
    model.__dict__.pop(_METHODS, None)
    model.__dict__.pop("_peft_named_adapters", None)  # parked named adapters (lightning_peft.named)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


_PEFT_HOOKS = "_peft_hook_handles"


def add_peft_hook(module: nn.Module, handle: torch.utils.hooks.RemovableHandle) -> None:
    """Remember a hook lightning_peft registered, so :func:`unload` can remove it."""
    module.__dict__.setdefault(_PEFT_HOOKS, []).append(handle)


def _remove_peft_hooks(module: nn.Module) -> None:
    for handle in module.__dict__.pop(_PEFT_HOOKS, []):
        handle.remove()


def enable_input_grads(model: nn.Module, module: str | None = None) -> nn.Module:
    """Make the output of the input layer require grad, for *reentrant* activation checkpointing.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` only back-propagates into a block whose inputs require
    grad; behind a frozen embedding none do, and adapters inside the block get no gradient. Non-reentrant
    checkpointing (``use_reentrant=False``, PyTorch's recommendation) and transformers' own checkpointing need
    nothing. Returns ``model``; :func:`unload` removes the hook.

    Args:
        model: The adapted model.
        module: Name of the layer whose output feeds the checkpointed blocks; by default a transformers model's
            ``get_input_embeddings()``.
    """
    if module is not None:
        layer = model.get_submodule(module)
    elif callable(get_input_embeddings := getattr(model, "get_input_embeddings", None)):
        layer = get_input_embeddings()
    else:
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings(); pass module= the name of the layer whose output "
            "feeds the checkpointed blocks (e.g. module='embed')."
        )
    add_peft_hook(layer, layer.register_forward_hook(_output_requires_grad))
    return model


def _output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside this context every adapter is switched off.

    Example:
        >>> from lightning_peft import LoRA
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> with disable_adapters(model):
        ...     y = model(torch.ones(1, 4))
    """
    switched = [adapter for _, adapter in adapters(model) if adapter.enabled]
    for adapter in switched:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter in switched:
            adapter.enabled = True


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of an adapted model."""

    trainable: int
    total: int
    adapter: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable, total and adapter-owned parameters (shared parameters counted once).

    Example:
        >>> from lightning_peft import LoRA
        >>> print(trainable_summary(inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))))
        trainable params: 16 || all params: 36 || trainable%: 44.4444
    """
    params = {id(p): p for p in model.parameters()}
    owned = {id(t) for _, a in adapters(model) for _, t in a.adapter_tensors() if isinstance(t, nn.Parameter)}
    return TrainableSummary(
        trainable=sum(global_shape(p).numel() for p in params.values() if p.requires_grad),
        total=sum(global_shape(p).numel() for p in params.values()),
        adapter=sum(global_shape(p).numel() for i, p in params.items() if i in owned),
    )

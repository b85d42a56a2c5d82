"""Several named adapters on one model: add, switch, disable, delete.

Design: the model's module tree always holds exactly one adapter set, the active one, so every name in it is the
single-adapter name (``x.lora_A``) and everything else (``adapter_state_dict``, ``save_adapter``, ``merge``,
checkpoints, optimizers built afterwards) works on the active adapter unchanged. Each named adapter is the set of
:class:`~lightning_peft.adapter.Adapter` modules one :func:`~lightning_peft.injection.inject` built, one per
adapted layer, each self-contained (tensors, rank, scale, hooks' switch); all of them wrap the *same* base layer
objects. The inactive sets are parked outside the tree in one registry on the root module::

    model.lin = LoRALinear(base=lin, lora_A, lora_B)      ◄── active "a"
    registry: {"a": [("lin", <LoRALinear a>)], "b": [("lin", <LoRALinear b>), ("out", <LoRALinear b>)]}

Switching parks the active set (each adapter is replaced by its ``base_layer``, innermost first) and puts the
target's adapters back (outermost first), then moves them to their base layer's device and re-freezes the model.
This needs no per-attribute dictionaries (PEFT's ``self.r[name]``), works the same for LoRA, prompts and prefixes,
and costs one module swap per layer. Parked adapters are not in ``model.state_dict()``: a checkpoint holds the active
adapter (save each with :func:`set_adapter` + ``save_adapter``).

``trainable_modules`` belong to their adapter: their values are kept per adapter and restored on a switch. A tensor
one adapter trains and another does not is restored to its base value, which we know only if the first adapter to
train it was added with :func:`add_adapter` (before training); otherwise switching raises instead of computing with
another adapter's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import Adapter, adapters, is_injected
from lightning_peft.injection import applied_methods, inject, replace_module
from lightning_peft.methods import Method
from lightning_peft.record import find_record, record
from lightning_peft.tensors import marked, refresh_trainable

DEFAULT = "default"


@dataclass
class _Entry:
    """One named adapter: its adapter modules by tree name, its methods, and the tensors it trains in base modules."""

    layers: list[tuple[str, Adapter]] = field(default_factory=list)
    methods: list[Method] = field(default_factory=list)
    marks: list[tuple[nn.Module, frozenset[str]]] = field(default_factory=list)
    values: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (id(module), local) -> trained copy


@dataclass
class _Registry:
    entries: dict[str, _Entry] = field(default_factory=dict)
    active: str | None = None
    base_values: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # untrained values of marked tensors
    modules: dict[int, nn.Module] = field(default_factory=dict)  # id -> base module holding marked tensors


def _registry(model: nn.Module) -> _Registry:
    registry = record(model).named_adapters
    if registry is None:
        registry = _Registry()
        if is_injected(model):
            registry.entries[DEFAULT] = _Entry()
            registry.active = DEFAULT
        record(model).named_adapters = registry
    return registry


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model`` (an injected model without named ones has one, ``"default"``).

    Example:
        >>> from lightning_peft import LoRAConfig, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> list_adapters(add_adapter(model, "other", LoRAConfig(r=1, target_modules=["0"])))
        ['default', 'other']
    """
    found = find_record(model)
    registry = found.named_adapters if found is not None else None
    if registry is None:
        return [DEFAULT] if is_injected(model) else []
    return list(registry.entries)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter in use, or ``None`` when adapters are disabled (or there are none)."""
    found = find_record(model)
    registry = found.named_adapters if found is not None else None
    if registry is None:
        return DEFAULT if is_injected(model) else None
    return registry.active


def add_adapter(model: nn.Module, name: str, *methods: Method) -> nn.Module:
    """Add an adapter called ``name`` built by ``methods`` and make it the active one; returns ``model``.

    Adapters already on the model stay available under their names (unnamed ones become ``"default"``).
    Build the optimizer after adding: the new adapter's parameters are new tensors.

    Raises:
        ValueError: ``name`` is taken; an adapter is merged; PiSSA is involved (it changes the shared base weights);
            or the new adapter would run with another adapter's ``trainable_modules`` (see the module docstring).
    """
    registry = _registry(model)
    if name in registry.entries:
        raise ValueError(f"an adapter named {name!r} exists already ({list(registry.entries)}); delete_adapter() it "
                         "first or pick another name.")
    pissa = [n for n, a in adapters(model) if getattr(a, "pissa_applied", False)]
    if pissa or (registry.entries and any(getattr(m, "init", None) == "pissa" for m in methods)):
        raise ValueError(f"adding {name!r}: LoRA with init='pissa' rewrites the base weights that named adapters "
                         "share. Use init='default' or 'gaussian' for adapters you switch between.")
    previous = registry.active
    _park(model, registry)
    marked_before = _marked(model)
    inject(model, *methods)
    entry = _Entry(layers=list(adapters(model)), methods=applied_methods(model), marks=_marked(model))
    for module, marks in _marked(model):
        for local in marks:
            key = (id(module), local)
            registry.modules[id(module)] = module
            if key not in registry.base_values and not _ever_marked(registry, key, marked_before):
                registry.base_values[key] = _tensor(module, local).detach().clone()  # nobody trained it yet
    registry.entries[name] = entry
    registry.active = name
    try:
        _check_restorable(registry, name)
    except ValueError:
        del registry.entries[name]
        _discard_and_restore(model, registry, previous)
        raise
    _restore_values(registry, entry)
    return model


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make the adapter ``name`` the active one (``None``: no adapter, the base model); returns ``model``.

    Example:
        >>> import torch
        >>> from lightning_peft import LoRAConfig, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> model = add_adapter(model, "other", LoRAConfig(r=1, target_modules=["0"]))
        >>> active_adapter(set_adapter(model, "default"))
        'default'

    Raises:
        KeyError: No adapter has that name.
        ValueError: The active adapter is merged (``unmerge(model)`` first), or a ``trainable_modules`` tensor could
            not be restored (see the module docstring).
    """
    registry = _registry(model)
    if name is not None and name not in registry.entries:
        raise KeyError(f"no adapter named {name!r}; the model has {list(registry.entries)}.")
    if name == registry.active:
        return model
    _check_restorable(registry, name)
    _park(model, registry)
    _activate(model, registry, name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the inactive adapter ``name`` for good; returns ``model``.

    Raises:
        KeyError: No adapter has that name.
        ValueError: ``name`` is the active adapter: switch to another (or ``None``) first.
    """
    registry = _registry(model)
    if name not in registry.entries:
        raise KeyError(f"no adapter named {name!r}; the model has {list(registry.entries)}.")
    if name == registry.active:
        raise ValueError(f"{name!r} is the active adapter; call set_adapter(model, <another name or None>) before "
                         "deleting it.")
    del registry.entries[name]
    still = {key for entry in registry.entries.values() for key in _keys(entry.marks)}
    registry.base_values = {k: v for k, v in registry.base_values.items() if k in still}
    return model


def adapter_parts(
    model: nn.Module, name: str
) -> tuple[list[tuple[str, Adapter]], list[Method], list[tuple[nn.Module, frozenset[str]]]]:
    """The named adapter ``name``, active or parked, read without switching: its adapter modules by tree name, its
    methods, and the base tensors it trains (``trainable_modules``: ``(module, local names)``).

    Raises:
        KeyError: No adapter has that name (the message lists the model's adapters).
    """
    found = find_record(model)
    registry = found.named_adapters if found is not None else None
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; the model has {list_adapters(model)}.")
    if registry is None or registry.active == name:
        return list(adapters(model)), applied_methods(model), _marked(model)
    entry = registry.entries[name]
    return list(entry.layers), list(entry.methods), list(entry.marks)


def same_layers(names: list[str], found: list[dict[str, Any]], purpose: str) -> None:
    """Raise unless every adapter in ``found`` (``{layer name: adapter module}`` per name of ``names``) adapts the
    same layers with the same adapter class; ``purpose`` ends the message (what needs them equal)."""
    first = found[0]
    for name, layers in zip(names[1:], found[1:], strict=True):
        missing, extra = sorted(set(first) - set(layers)), sorted(set(layers) - set(first))
        if missing or extra:
            raise ValueError(
                f"adapters {names[0]!r} and {name!r} adapt different layers (only {names[0]!r}: {missing[:3]}, only "
                f"{name!r}: {extra[:3]}); {purpose}."
            )
        for layer, adapter in layers.items():
            if type(adapter) is not type(first[layer]):
                raise ValueError(f"adapters {names[0]!r} and {name!r} adapt {layer!r} differently "
                                 f"({type(first[layer]).__name__} vs {type(adapter).__name__}); {purpose}.")


# --- parking and activating -----------------------------------------------------------------------------------
def _park(model: nn.Module, registry: _Registry) -> None:
    """Take the active adapter set out of the tree and remember it (and its trained base tensors)."""
    if registry.active is None:
        return
    merged = [n for n, a in adapters(model) if a.merged]
    if merged:
        raise ValueError(f"adapter {registry.active!r} is merged into the base weights ({merged[:3]}); call "
                         "unmerge(model) before switching, so the next adapter starts from the base weights.")
    entry = registry.entries[registry.active]
    entry.layers = list(adapters(model))
    entry.methods = applied_methods(model)
    entry.marks = _marked(model)
    entry.values = {(id(m), local): _tensor(m, local).detach().clone() for m, marks in entry.marks for local in marks}
    for module, _ in entry.marks:
        registry.modules[id(module)] = module
        record(module).saved_tensors = frozenset()
    for layer_name, adapter in reversed(entry.layers):
        replace_module(model, layer_name, adapter.unwrap())
        adapter.enabled = False  # hooks of parked prompts (registered on the model) must do nothing
    record(model).methods = []
    registry.active = None


def _activate(model: nn.Module, registry: _Registry, name: str | None) -> None:
    entry = registry.entries[name] if name is not None else _Entry()
    for layer_name, adapter in entry.layers:
        replace_module(model, layer_name, adapter)
        adapter.enabled = True
        device = next((t.device for t in adapter.unwrap().parameters()), None)
        if device is not None:
            adapter.to(device)
    _restore_values(registry, entry)
    for module, marks in entry.marks:
        record(module).saved_tensors = marks
    record(model).methods = list(entry.methods)
    registry.active = name
    refresh_trainable(model)


@torch.no_grad()
def _restore_values(registry: _Registry, entry: _Entry) -> None:
    """Base values into the tensors ``entry`` does not train, its own trained values into those it does."""
    trained = _keys(entry.marks)
    for key, value in registry.base_values.items():
        if key not in trained:
            _tensor(registry.modules[key[0]], key[1]).copy_(value)
    for (module_id, local), value in entry.values.items():
        _tensor(registry.modules[module_id], local).copy_(value)


def _discard_and_restore(model: nn.Module, registry: _Registry, previous: str | None) -> None:
    """Drop a half-added adapter from the tree and bring back the one that was active."""
    for layer_name, adapter in reversed(list(adapters(model))):
        replace_module(model, layer_name, adapter.unwrap())
    for module, _ in _marked(model):
        record(module).saved_tensors = frozenset()
    _activate(model, registry, previous)


def _check_restorable(registry: _Registry, name: str | None) -> None:
    """Raise if switching to ``name`` would leave a tensor trained by another adapter without a value to restore."""
    target = _keys(registry.entries[name].marks) if name is not None else set()
    for other, entry in registry.entries.items():
        for key in _keys(entry.marks) - target:
            if key not in registry.base_values:
                module = registry.modules[key[0]]
                raise ValueError(
                    f"adapter {other!r} trains {type(module).__name__}.{key[1]} (trainable_modules), "
                    f"{'adapter ' + repr(name) if name else 'the base model'} does not, and its base value is gone: "
                    f"{other!r} trained it in place before it was named. Give every named adapter the same "
                    "trainable_modules, or add adapters with add_adapter() before training them."
                )


def _marked(model: nn.Module) -> list[tuple[nn.Module, frozenset[str]]]:
    return [(m, marked(m)) for m in model.modules() if marked(m) and not isinstance(m, Adapter)]


def _keys(marks: list[tuple[nn.Module, frozenset[str]]]) -> set[tuple[int, str]]:
    return {(id(module), local) for module, names in marks for local in names}


def _ever_marked(
    registry: _Registry, key: tuple[int, str], marked_before: list[tuple[nn.Module, frozenset[str]]]
) -> bool:
    return key in _keys(marked_before) or any(key in _keys(e.marks) for e in registry.entries.values())


def _tensor(module: nn.Module, local: str) -> torch.Tensor:
    return module.get_parameter(local) if local in module._parameters else module.get_buffer(local)

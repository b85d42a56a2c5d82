"""The plugin's bookkeeping on a module: one typed record, behind one accessor.

Everything lightning_peft remembers about a module of the user's model (which of its tensors train and save, the
hooks it registered, the methods injected into a root, an adapter's origin) lives in one :class:`Record`, stored in
the module's ``__dict__`` under one key. ``deepcopy`` and pickling copy it with the module; :func:`forget_injection`
(``unload``) clears what injection recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from lightning_peft.methods import Method

_KEY = "_peft"


class Origin(NamedTuple):
    """Where an adapter came from: the method's position in its root's methods, the method, its name in that root."""

    position: int
    method: Method
    name: str


@dataclass(eq=False)
class Record:
    """What lightning_peft keeps on one module; every field has the value of a module it never touched."""

    #: Local names of this module's tensors that train and save with the adapter (``trainable_modules``, statistics).
    saved_tensors: frozenset[str] = frozenset()
    #: Hooks lightning_peft registered on this module (``unload`` removes them).
    hooks: list[RemovableHandle] = field(default_factory=list)
    #: A BatchNorm whose running statistics are frozen by two of those hooks.
    frozen_stats: bool = False
    #: The BatchNorm's training flag during its forward while its statistics are frozen.
    was_training: bool | None = None
    #: A layer an adapter wraps (its own FSDP1 unit under ``fsdp_auto_wrap_policy``).
    wrapped_base: bool = False
    #: On an adapter: where it came from.
    origin: Origin | None = None
    #: On the root passed to ``inject``: the methods applied, in order.
    methods: list[Method] = field(default_factory=list)
    #: On the root: the named adapters parked outside the tree (:mod:`lightning_peft.named`).
    named_adapters: Any = None
    #: On an attention module of transformers: the prefix adapter that wraps it.
    prefix_adapter: nn.Module | None = None
    #: What ``unload`` undoes on this module besides removing adapters and hooks (a tie LoRA undid), newest last;
    #: each is called with ``keep_weights``: whether the layers keep their weights (``merge_and_unload``).
    undo: list[Callable[[bool], None]] = field(default_factory=list)
    #: On a LightningModule: methods to inject right after its ``configure_model``.
    pending: list[Method] = field(default_factory=list)
    #: On a PEFTMixin module: whether ``configure_peft`` was applied.
    configured: bool = False
    #: On a module the participation check watches: its state (:mod:`lightning_peft.guard`).
    guard: Any = None


def record(module: nn.Module) -> Record:
    """The record of ``module``, made empty on first use."""
    found = module.__dict__.get(_KEY)
    if found is None:
        found = module.__dict__[_KEY] = Record()
    return found


def find_record(module: nn.Module | None) -> Record | None:
    """The record of ``module`` if lightning_peft made one, without making one."""
    return None if module is None else module.__dict__.get(_KEY)


def add_peft_hook(module: nn.Module, handle: RemovableHandle) -> None:
    """Remember a hook lightning_peft registered, so ``unload`` can remove it."""
    record(module).hooks.append(handle)


def remove_peft_hooks(module: nn.Module) -> None:
    """Remove the hooks lightning_peft registered on ``module``."""
    found = find_record(module)
    if found is not None:
        for handle in found.hooks:
            handle.remove()
        found.hooks.clear()


def forget_injection(model: nn.Module, keep_weights: bool = False) -> None:
    """Remove every hook lightning_peft registered under ``model`` and what inject recorded there, and run the undo
    steps (``unload``; ``keep_weights`` for ``merge_and_unload``, whose layers keep their merged weights)."""
    for module in model.modules():
        found = find_record(module)
        if found is not None:
            remove_peft_hooks(module)
            for step in reversed(found.undo):
                step(keep_weights)
            found.undo.clear()
            found.saved_tensors, found.frozen_stats, found.wrapped_base = frozenset(), False, False
            found.methods, found.named_adapters, found.origin, found.guard = [], None, None, None
            if all(getattr(found, f.name) == getattr(_EMPTY, f.name) for f in fields(Record)):
                del module.__dict__[_KEY]  # nothing of lightning_peft is left to pickle with the module


_EMPTY = Record()

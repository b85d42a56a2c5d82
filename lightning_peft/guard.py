"""The participation check: proof, at run time, that every enabled adapter took part in the computation.

An adapter can be silently left out of a forward pass without any error: a parent that reads a wrapped layer's
``weight`` itself (torch's eval fast path in ``nn.TransformerEncoderLayer``, ``F.linear(child.weight)``), a fused
path that skips a layer's hooks or a nested adapter, an attention seam a new upstream release no longer calls. The
outputs then equal the frozen model's, and nothing says so.

So the first forward in each mode a model runs in (train, eval, and each under ``no_grad``/``inference_mode``)
is watched: which modules were called (a process-wide module pre-hook, installed for that one forward only) and
which adapters put their tensors into the computation (each adapter reports it with :func:`took_part` where its
tensors enter). Then, for each enabled adapter:

* its tensors entered the computation: it took part (a fused path that skipped a hooked or adapted base layer
  inside it is still an error);
* it was not called, but code around it read its layer's tensors (``weight``, ``in_proj_weight``: reads through an
  adapter are reported with :func:`read_through`): that code used the layer without the adapter. Error, naming
  the adapter, its method, the module holding it and the fix;
* it was called, but its tensors never entered the computation: error;
* it was neither called nor read (an auxiliary head in eval, an MoE expert no token reached): not an error; a
  :class:`~lightning_peft.errors.PEFTWarning` says so, once per model.

A mode with an error stays unchecked: every forward in it raises until the cause is fixed.

The watch hooks sit on the model passed to ``inject`` and on its children that hold adapters (the modules a
``training_step`` calls); after a mode is checked they return at once, so later forwards cost two attribute reads.
Nothing is watched while ``torch.compile`` traces. ``participation_check(model, False)`` switches the check off.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.adapter import Adapter, adapters, innermost, is_injected
from lightning_peft.errors import ParticipationError, PEFTWarning
from lightning_peft.participation import Window, took_part, watch, watched
from lightning_peft.record import add_peft_hook, find_record, record

# took_part is re-exported for the adapters of users' own methods
__all__ = ["ParticipationError", "install_participation_check", "participation_check", "took_part"]


@dataclass
class _Guard:
    """The check's state on one watched module: the modes already checked, and whether it is on."""

    enabled: bool = True
    checked: set[tuple[bool, bool]] = field(default_factory=set)
    warned_idle: bool = False
    window: Window | None = None
    handles: list[RemovableHandle] = field(default_factory=list)

    def open(self, module: nn.Module, args: Any) -> None:
        if not self.enabled or watched() is not None or torch.compiler.is_compiling():
            return
        if _mode(module) in self.checked:
            return
        window = self.window = Window(called={id(module)})
        window.hook = nn.modules.module.register_module_forward_pre_hook(
            lambda called, _: window.called.add(id(called)))
        watch(window)

    def close(self, module: nn.Module, args: Any, output: Any) -> None:
        window, self.window = self.window, None
        if window is None:
            return
        watch(None)
        assert window.hook is not None  # internal: set when the window opened
        window.hook.remove()
        if output is None:  # the forward raised (always_call hook): nothing to judge
            return
        errors, idle = _verdict(module, window)
        if errors:  # the mode stays unchecked: every forward in it raises until the cause is fixed
            raise ParticipationError(
                f"{len(errors)} adapter(s) of {type(module).__name__} did not take part in this forward "
                f"({_mode_name(module)}), so their updates were silently left out:\n- " + "\n- ".join(errors[:8])
                + "\nIf this is intended, lightning_peft.participation_check(model, False) switches the check off."
            )
        for inner in module.modules():  # the verdict covers the watched modules inside this one too
            found = find_record(inner)
            if found is not None and found.guard is not None:
                found.guard.checked.add(_mode(module))
        if idle and not self.warned_idle:
            self.warned_idle = True
            warnings.warn(
                f"{len(idle)} adapter(s) of {type(module).__name__} did not run in its first {_mode_name(module)} "
                f"forward, because the modules holding them were not called ({', '.join(idle[:4])}); they change "
                "nothing and get no gradient from such steps. (Said once.)", PEFTWarning, stacklevel=2,
            )


def _mode(module: nn.Module) -> tuple[bool, bool]:
    return module.training, torch.is_grad_enabled()


def _mode_name(module: nn.Module) -> str:
    training, grad = _mode(module)
    return ("train" if training else "eval") + ("" if grad else " under no_grad")


def _verdict(root: nn.Module, window: Window) -> tuple[list[str], list[str]]:
    """Errors for adapters left out of the watched forward, and names of those whose modules did not run."""
    errors, idle = [], []
    for name, adapter in adapters(root):
        if not adapter.enabled or adapter.merged:
            continue
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if parent_name else root
        label = f"{_method(adapter)} adapter {name!r}"
        base = adapter._modules.get("base_layer")
        called = id(adapter) in window.called
        if id(adapter) in window.used or (called and not adapter.reports_participation):
            if called and base is not None and id(base) not in window.called and (
                    isinstance(base, Adapter) or base._forward_hooks or base._forward_pre_hooks):
                errors.append(f"{label} computed its layer without calling the {type(base).__name__} inside it, so "
                              "that layer's hooks or nested adapter were skipped (a fused path). Report this as a bug.")
        elif called:
            errors.append(f"{label} ran, but its tensors never entered the computation: the "
                          f"{type(innermost(adapter)).__name__} inside it computed without the place where "
                          "the adapter adds them (an upstream release may have changed that code path).")
        elif id(adapter) in window.read:
            child, read = name.rpartition(".")[2], ", ".join(sorted(window.read[id(adapter)]))
            errors.append(
                f"{label} was not called, yet {read} were read through it: {type(parent).__name__} "
                f"{parent_name or '(the model)'!r} uses {child!r} without calling it (a fused fast path, or the "
                f"weight passed to a function such as F.linear). Fix: lightning_peft.register_weight_reader("
                f"{type(parent).__name__}, [{child!r}]) makes LoRA answer {child}.weight with its update folded in; "
                f"or leave {name!r} out of target_modules."
            )
        else:
            idle.append(repr(name))
    return errors, idle


def _method(adapter: nn.Module) -> str:
    origin = record(adapter).origin
    if origin is None:
        return type(adapter).__name__
    return str(getattr(origin.method, "label", type(origin.method).__name__))


def install_participation_check(model: nn.Module) -> None:
    """Watch ``model`` and its children that hold adapters (once each; ``unload`` removes the hooks)."""
    entries = [model, *(child for child in model.children() if is_injected(child))]
    for module in entries:
        guard = record(module).guard = record(module).guard or _Guard()
        for handle in guard.handles:  # registered again: the window must enclose hooks that methods added since
            handle.remove()
        guard.handles = [module.register_forward_pre_hook(functools.partial(_open, guard), prepend=True),
                         module.register_forward_hook(functools.partial(_close, guard), always_call=True)]
        for handle in guard.handles:
            add_peft_hook(module, handle)


def _open(guard: _Guard, module: nn.Module, args: Any) -> None:
    guard.open(module, args)


def _close(guard: _Guard, module: nn.Module, args: Any, output: Any) -> None:
    guard.close(module, args, output)


def participation_check(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the participation check of ``model`` on or off (it is on after ``inject``); returns ``model``.

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = participation_check(inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"])), False)
    """
    for module in model.modules():
        found = find_record(module)
        if found is not None and found.guard is not None:
            found.guard.enabled = enabled
    return model

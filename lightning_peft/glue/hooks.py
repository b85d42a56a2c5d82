"""The one way lightning_peft extends a hook: an instance attribute that runs the method, then the plugin's steps.

A LightningModule hook (``configure_model``, ``on_save_checkpoint``, ...) or a strategy's method
(``load_checkpoint``) is replaced on the instance, never on the class, by an :class:`_Extended` wrapper: it runs the
method the class defines (the user's own hook, whatever its ``super()`` chain) inside the plugin's contexts, then the
plugin's steps, once per call. The callbacks install the wrappers in ``setup``, the mixin when its module is created.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from lightning_utilities.core.overrides import is_overridden

#: ``context(owner)``: a context manager the method runs inside.
Context = Callable[[Any], contextlib.AbstractContextManager[Any]]


class _Extended:
    """Instance attribute replacing a method of ``owner`` (a LightningModule hook, a strategy's method): the method
    as defined before, run inside each context, then each step.

    A context is a module-level function ``context(owner)`` returning a context manager; a step is a module-level
    function ``step(owner, *args)``. The wrapper holds the owner and the method's name, not bound methods, so
    ``copy.deepcopy`` and pickling (``ddp_spawn``) give a copy that runs on the copy. ``__wrapped__`` is the class's
    function, so Lightning's ``is_overridden`` still sees the user's code.

    The class's method runs through the class, so a ``super()`` chain of the user's hooks never meets the wrapper
    again: the steps run once per call, after all of the user's code, whether or not it calls ``super()``.
    """

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name
        self.contexts: list[Context] = []
        self.steps: list[Callable[..., None]] = []
        self.inner = owner.__dict__.get(name)  # an instance-level override someone set before us, if any
        functools.update_wrapper(self, getattr(type(owner), name))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        method = self.inner or getattr(type(self.owner), self.name).__get__(self.owner)
        with contextlib.ExitStack() as stack:
            for context in self.contexts:
                stack.enter_context(context(self.owner))
            result = method(*args, **kwargs)
        for step in self.steps:
            step(self.owner, *args)
        return result


def _extended(owner: Any, name: str) -> _Extended:
    current = owner.__dict__.get(name)
    if not isinstance(current, _Extended):
        current = _Extended(owner, name)
        owner.__dict__[name] = current
    return current


def run_after(owner: Any, name: str, step: Callable[..., None]) -> None:
    """Make ``owner.<name>(...)`` also run ``step(owner, ...)`` afterwards (once, however often this is called)."""
    steps = _extended(owner, name).steps
    if step not in steps:
        steps.append(step)


def run_inside(owner: Any, name: str, context: Context) -> None:
    """Make ``owner.<name>(...)`` run inside ``context(owner)`` (once, however often this is called)."""
    contexts = _extended(owner, name).contexts
    if context not in contexts:
        contexts.append(context)


def steps_after(owner: Any, name: str) -> list[Callable[..., None]]:
    """The steps :func:`run_after` gave ``owner.<name>``, in the order they run (empty if it gave none)."""
    current = owner.__dict__.get(name)
    return list(current.steps) if isinstance(current, _Extended) else []


def overrides_hook(pl_module: Any, hook: str) -> bool:
    """Whether the module's class defines ``hook`` beyond LightningModule's default.

    Looks the LightningModule base up in the class's MRO, so modules of ``lightning.pytorch`` and of
    ``pytorch_lightning`` both work (Lightning's own ``is_overridden`` only knows its namespace).
    """
    mro = type(pl_module).__mro__
    base = next((c for c in mro if c.__name__ == "LightningModule" and c.__module__.endswith("core.module")), None)
    return base is not None and is_overridden(hook, pl_module, parent=base)

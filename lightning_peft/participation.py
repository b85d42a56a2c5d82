"""What the participation check watches: one forward's module calls, and adapters reporting their part.

Adapters call :func:`took_part` where their tensors enter the computation, and :class:`~lightning_peft.adapter.Adapter`
calls :func:`read_through` when code reads a wrapped layer's tensor through it. Both cost one global read while no
forward is watched. The check itself is :mod:`lightning_peft.guard`; this module imports nothing of the package, so
every adapter can report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class Window:
    """What one watched forward saw, by ``id``: the modules called, the adapters whose tensors were used, and the
    tensors read off adapters by other code (``{adapter: {attribute names}}``)."""

    called: set[int] = field(default_factory=set)
    used: set[int] = field(default_factory=set)
    read: dict[int, set[str]] = field(default_factory=dict)
    hook: RemovableHandle | None = None


_WINDOW: Window | None = None  # the forward being watched now, if any (one at a time per process)


def took_part(adapter: nn.Module) -> None:
    """Report that ``adapter``'s tensors entered the computation; adapters call it where that happens."""
    if _WINDOW is not None:
        _WINDOW.used.add(id(adapter))


def read_through(adapter: nn.Module, name: str) -> None:
    """Report that code read the tensor ``name`` (a base layer's ``weight``, say) off ``adapter``."""
    if _WINDOW is not None:
        _WINDOW.read.setdefault(id(adapter), set()).add(name)


def watched() -> Window | None:
    """The forward being watched now, if any."""
    return _WINDOW


def watch(window: Window | None) -> None:
    """Start watching ``window`` (``None``: stop)."""
    global _WINDOW
    _WINDOW = window

"""Errors and warnings raised by lightning_peft.

Every error subclasses a builtin (``ValueError``, ``TypeError``, ``RuntimeError``), so ``except ValueError`` keeps
working; every warning is a :class:`PEFTWarning`, so users can filter ours without hiding others.
"""

from __future__ import annotations


class PEFTWarning(UserWarning):
    """A warning from lightning_peft (filter with ``warnings.filterwarnings("ignore", category=PEFTWarning)``)."""


class TargetNotFoundError(ValueError):
    """A target selection matched nothing, or matched modules the method cannot adapt."""


class BaseModelMismatchError(ValueError):
    """Saved adapter state was made for a base model with other parameter names or shapes."""


class AdapterStateError(ValueError):
    """Saved adapter state is missing tensors, has extra ones, or names another method configuration."""


class ParticipationError(RuntimeError):
    """An enabled adapter did not take part in a forward pass: its update was silently left out
    (:mod:`lightning_peft.guard`)."""

"""The base class of every module lightning_peft adds to a model, and how to find them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.participation import read_through


class Adapter(nn.Module):
    """Base class of every module lightning_peft adds to a model.

    An adapter owns its learnable tensors as plain ``nn.Parameter`` attributes. When it wraps a layer, the
    layer is its ``base_layer`` child and attribute reads it does not know (``weight``, ``in_features``) fall
    through to that layer, so code that inspects the layer keeps working.
    """

    mergeable: ClassVar[bool] = False
    #: Whether the adapter can be an FSDP1 wrap unit of its own (its tensors are used only inside its forward).
    fsdp_unit: ClassVar[bool] = True
    #: Whether it calls :func:`lightning_peft.guard.took_part` where its tensors enter the computation (otherwise the
    #: participation check takes a call of its ``forward`` as taking part).
    reports_participation: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.merged = False

    def reset_parameters(self) -> None:
        """Restore the adapter's initial values, at which the adapted model equals the base model."""
        raise NotImplementedError

    def merge_problem(self) -> str | None:
        """Why :meth:`merge` cannot be exact for this adapter's layer, or ``None`` (asked before anything merges)."""
        return None

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
            found = getattr(base, name)
            if isinstance(found, torch.Tensor):
                read_through(self, name)  # code reading the layer's tensors around the adapter: the guard sees it
            return found


def innermost(module: nn.Module) -> nn.Module:
    """The module under any chain of adapters wrapping it (a LoRA on an embedding, a prefix on an attention)."""
    while isinstance(module, Adapter):
        module = module.unwrap()
    return module


def adapters(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """``(name, adapter)`` for every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def is_injected(model: nn.Module) -> bool:
    """Whether ``model`` holds any adapter."""
    return any(True for _ in adapters(model))

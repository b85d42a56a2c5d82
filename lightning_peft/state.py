"""Adapter state: collect it, check it against a model, and save or load it as safetensors + JSON.

A saved adapter is a directory with ``adapter_model.safetensors`` (adapter tensors and the tensors of
``trainable_modules``, nothing else) and ``adapter_config.json`` (format version, method configurations and
the base model's parameter shapes). Loading never executes code.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from lightning_peft.adapter import Adapter, adapters, is_injected
from lightning_peft.errors import AdapterStateError, BaseModelMismatchError, TargetNotFoundError
from lightning_peft.files import read_config, read_tensors, write_adapter_files
from lightning_peft.injection import applied_methods, inject
from lightning_peft.methods import Method, MethodConfig
from lightning_peft.record import find_record
from lightning_peft.targets import select_names
from lightning_peft.tensors import adapter_tensors, clean_name
from lightning_peft.zero3 import gathered, global_shape, is_nonzero_rank, is_partitioned

FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds: adapter parameters and buffers, plus ``trainable_modules``.

    Keys are the names in ``model.state_dict()``; the frozen base weights are left out. Under DeepSpeed ZeRO-3
    the partitioned tensors are gathered, so call it on every rank; the result holds full copies.

    Example:
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoRA(r=2, target_modules=["0"],
        ...                trainable_modules=["1"]))
        >>> sorted(adapter_state_dict(model))
        ['0.lora_A', '0.lora_B', '1.bias', '1.weight']
    """
    tensors = dict(adapter_tensors(model))
    with gathered(tensors.values()) as partitioned:
        if partitioned:  # the gathered data is released on exit
            return {name: tensor.detach().clone() for name, tensor in tensors.items()}
    return {name: tensor.detach() for name, tensor in tensors.items()}


def base_shapes(model: nn.Module, state_dict: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """Name → shape of every base-model tensor, with names as before injection: a fingerprint of the base model.

    Adapter-owned tensors are left out, so the fingerprint is the same before and after :func:`inject`. Pass the
    ``state_dict`` a strategy gathered (FSDP) to read global shapes from it instead of the model's local shards.
    ZeRO-3 partitioned parameters report their full shapes.
    """
    owned = {clean_name(f"{n}.{local}") for n, m in model.named_modules() if isinstance(m, Adapter)
             for local, _ in m.adapter_tensors()}
    source = model.state_dict(keep_vars=True) if state_dict is None else state_dict
    return {
        _BASE_LAYER.sub("", f".{name}")[1:]: list(global_shape(tensor))  # "a.base_layer.weight" -> "a.weight"
        for name, tensor in ((clean_name(n), t) for n, t in source.items())
        if name not in owned and isinstance(tensor, torch.Tensor)
    }


_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def check_base_shapes(model: nn.Module, saved: dict[str, list[int]], source: str = "the checkpoint") -> None:
    """Raise :class:`BaseModelMismatchError` naming what differs between ``model`` and a saved base fingerprint."""
    current = base_shapes(model)
    missing = [n for n in saved if n not in current]
    extra = [n for n in current if n not in saved]
    reshaped = [
        f"{n}: saved {saved[n]}, model {current[n]}"
        for n in saved
        if n in current and list(current[n]) != list(saved[n])
    ]
    if missing or extra or reshaped:
        parts = []
        if reshaped:
            parts.append(f"{len(reshaped)} tensors differ in shape ({'; '.join(reshaped[:4])})")
        if missing:
            parts.append(f"{len(missing)} base tensors of {source} are not in the model ({', '.join(missing[:4])})")
        if extra:
            parts.append(f"{len(extra)} model tensors were not in the saved base ({', '.join(extra[:4])})")
        raise BaseModelMismatchError(
            f"{source} was made for another base model: {'; '.join(parts)}. "
            "Load it into the same architecture and size it was trained on."
        )


def check_adapter_state(model: nn.Module, state: dict[str, Any], source: str = "the checkpoint") -> None:
    """Raise :class:`AdapterStateError` if ``state`` lacks adapter tensors of ``model`` or has other shapes."""
    expected = {name: tensor for name, tensor in adapter_tensors(model)}
    state = {clean_name(name): tensor for name, tensor in state.items()}  # as adapter_tensors names them
    missing = [n for n in expected if n not in state]
    reshaped = [
        f"{n}: saved {list(state[n].shape)}, model {list(global_shape(t))}"
        for n, t in expected.items() if n in state and tuple(state[n].shape) != tuple(global_shape(t))
    ]
    if missing or reshaped:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} adapter tensors ({', '.join(missing[:4])})")
        if reshaped:
            detail.append(f"other shapes ({'; '.join(reshaped[:4])})")
        raise AdapterStateError(
            f"{source} does not fit the adapters of {type(model).__name__}: {'; '.join(detail)}. Inject the same "
            "methods with the same arguments (rank, targets, num_tokens) as when it was saved."
        )


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, source: str = "the adapter state"
) -> nn.Module:
    """Copy saved adapter tensors into an injected ``model``; with ``strict``, extra tensors are an error too.

    Under DeepSpeed ZeRO-3 call it on every rank with the same ``state``: rank 0's copy is scattered to all.
    ``source`` is how error messages name where ``state`` came from (``load_adapter`` passes its directory).

    Raises:
        AdapterStateError: Tensors are missing, extra (with ``strict``), of other shapes, NaN/inf, integers where the
            model has floats (or the reverse), or the model's adapters are merged (unmerge first)."""
    _refuse_merged(model, source)
    check_adapter_state(model, state, source)
    check_tensor_values(state, source)
    expected = dict(adapter_tensors(model))
    kinds = [f"{n}: saved {state[n].dtype}, model {t.dtype}" for n, t in expected.items()
             if state[n].is_floating_point() != t.is_floating_point()]
    if kinds:
        raise AdapterStateError(
            f"the adapter state has integer tensors where the model has floating-point ones, or the reverse "
            f"({'; '.join(kinds[:4])}); copying would cast them silently. Save the adapter again from the trained "
            "model."
        )
    extra = [n for n in state if n not in expected]
    if strict and extra:
        raise AdapterStateError(
            f"the adapter state holds {len(extra)} tensors this model does not adapt ({', '.join(extra[:4])}); "
            "inject the methods it was saved with, or pass strict=False to skip them."
        )
    with torch.no_grad(), gathered(expected.values(), modifier_rank=0):
        for name, tensor in expected.items():
            tensor.copy_(state[name])
    return model


def method_configs(model: nn.Module) -> list[dict[str, Any]]:
    """The configurations of the methods that made the adapters of ``model``, in the order they were injected.

    For the root passed to :func:`inject` (a LightningModule, with the callbacks or the mixin) these are the
    recorded methods. For a module inside it (``lit_module.model``) they are the methods of the adapters it holds,
    with target rules written as full names from the root made relative to it, so the saved adapter loads into
    that module alone (a fresh ``transformers`` model, say).

    Raises:
        ValueError: ``model`` holds adapters whose origin is unknown (they were not made by :func:`inject`).
    """
    recorded = applied_methods(model)
    if recorded:
        return [method.to_dict() for method in recorded]
    found: dict[int, dict[str, Any]] = {}
    for local, adapter in adapters(model):
        origin = getattr(find_record(adapter), "origin", None)
        full = origin.name if origin is not None else ""
        local = clean_name(local)
        if not local:
            raise ValueError(f"save the module holding this {type(adapter).__name__}, not the adapter itself.")
        if origin is None or not full.endswith(local) or (full != local and full[-len(local) - 1] != "."):
            raise ValueError(
                f"{type(model).__name__} holds a {type(adapter).__name__} at {local!r} that inject() did not make "
                "here; save the model the methods were injected into."
            )
        found.setdefault(origin.position, relative_rules(origin.method.to_dict(), full[: len(full) - len(local)]))
    return [_within(model, found[position]) for position in sorted(found)]


def _within(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the ``trainable_modules`` rules that select nothing in ``model`` (a Lightning head)."""
    rules = config.get("trainable_modules")
    if not rules:
        return config
    kept = [rule for rule in ([rules] if isinstance(rules, str) else rules) if _selects(model, rule)]
    return {**config, "trainable_modules": (kept[0] if isinstance(rules, str) else kept) if kept else None}


def _selects(model: nn.Module, rule: Any) -> bool:
    try:
        return bool(select_names(model, rule if isinstance(rule, str) else [rule]))
    except TargetNotFoundError:
        return False


def relative_rules(method: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A method configuration whose rules (target, trainable, exclude) written as full names under ``prefix``
    are made relative to the module at ``prefix`` (``"model."``)."""
    out = dict(method)
    for key in ("target_modules", "trainable_modules", "exclude_modules"):
        rules = out.get(key)
        if prefix and isinstance(rules, list):
            out[key] = [r[len(prefix):] if isinstance(r, str) and r.startswith(prefix) else r for r in rules]
    return out


def checkpoint_metadata(model: nn.Module, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an adapter checkpoint records beside the tensors: format, method configurations, base shapes."""
    return {
        "format_version": FORMAT_VERSION,
        "methods": method_configs(model),
        "base_shapes": base_shapes(model, state_dict),
    }


def save_adapter(model: nn.Module, path: str | Path, format: Literal["native", "peft"] = "native") -> Path:
    """Save the adapter of ``model`` to the directory ``path`` (safetensors + JSON config); returns the directory.

    ``format="peft"`` writes Hugging Face PEFT's layout instead (``peft.PeftModel.from_pretrained(base, path)``
    loads it), and raises a ``ValueError`` for features PEFT has no equivalent for; see
    :mod:`lightning_peft.peft_format`. Under DeepSpeed ZeRO-3 call it on every rank: the partitioned tensors are
    gathered collectively, and rank 0 writes.

    Example:
        >>> import tempfile
        >>> from lightning_peft import LoRA, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRA(r=2, target_modules=["0"]))
        >>> sorted(p.name for p in save_adapter(model, tempfile.mkdtemp()).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    if format == "peft":
        from lightning_peft.peft_format import save_peft

        return save_peft(model, path)
    if format != "native":
        raise ValueError(f"format={format!r} is not one of 'native', 'peft'.")
    if not is_injected(model):
        raise ValueError(f"{type(model).__name__} holds no adapter to save; inject a method first (inject(model, "
                         "LoRA(r=8))), or save the model that holds the adapters.")
    directory = Path(path)
    tensors = {name: tensor.contiguous().clone() for name, tensor in adapter_state_dict(model).items()}
    if is_nonzero_rank() and any(is_partitioned(t) for _, t in adapter_tensors(model)):
        return directory  # ZeRO-3: every rank took part in the gather, rank 0 writes
    return write_adapter_directory(directory, tensors, checkpoint_metadata(model))


def write_adapter_directory(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write an adapter directory in the native format: ``tensors`` as safetensors, ``meta`` (methods, base shapes)
    as JSON with this format's version; returns ``directory``. The write is atomic: a failed save leaves the adapter
    the directory held before (see :func:`~lightning_peft.files.write_adapter_files`)."""
    return write_adapter_files(directory, tensors, {**meta, "format_version": FORMAT_VERSION},
                               {"format": "lightning_peft"})


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; inject its methods first if needed.

    A directory saved by Hugging Face PEFT (or with ``format="peft"``) is recognised and read too. The load is all
    or nothing: when it fails, ``model`` is left as it was (no adapters injected, hooks, ``requires_grad`` flags and
    values unchanged).

    Raises:
        BaseModelMismatchError: ``model`` is not the base model the adapter was saved from.
        AdapterStateError: The file's tensors do not fit the model's adapters, hold NaN/inf or integers where the
            model has floats, a file is corrupt, or ``model``'s adapters are merged.
        FileNotFoundError: The directory lacks a file (a pickle-only folder is refused, with how to convert it).
    """
    from lightning_peft.peft_format import is_peft_directory, load_peft

    directory = Path(path)
    _refuse_merged(model, str(directory))
    if is_peft_directory(directory):
        with restored_on_error(model):
            return load_peft(model, directory)
    meta = read_config(directory)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterStateError(
            f"{directory} uses adapter format {meta['format_version']}; this lightning_peft reads up to "
            f"{FORMAT_VERSION}. Upgrade lightning_peft."
        )
    for key in ("methods", "base_shapes"):
        if not isinstance(meta.get(key), (list, dict)):
            raise AdapterStateError(f"{directory} has no {key!r} in its config: it was not written by save_adapter.")
    check_base_shapes(model, meta["base_shapes"], str(directory))
    state = read_tensors(directory)
    pissa = any(m.get("init") == "pissa" for m in meta["methods"])  # PiSSA changes base weights when injected
    with restored_on_error(model, values=pissa and not is_injected(model)):
        if not is_injected(model):
            inject(model, *[cast(Method, MethodConfig.from_dict(m)) for m in meta["methods"]])  # registered configs
        return load_adapter_state_dict(model, state, source=str(directory))  # values checked there, once


def check_tensor_values(state: dict[str, torch.Tensor], source: str = "the adapter state") -> None:
    """Raise :class:`AdapterStateError` for saved tensors holding NaN or infinity (a diverged run)."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterStateError(
            f"{source} holds NaN or infinite values in {len(bad)} tensors ({', '.join(bad[:4])}): the run that saved "
            "it diverged. Load an earlier checkpoint, or lower the learning rate and train again."
        )


def _refuse_merged(model: nn.Module, source: str) -> None:
    merged = [name for name, adapter in adapters(model) if adapter.merged]
    if merged:
        raise AdapterStateError(
            f"the adapters of {type(model).__name__} are merged into the base weights ({', '.join(merged[:4])}); "
            f"loading {source} now would leave the old update folded in. Call unmerge(model) first, or load into a "
            "fresh base model."
        )


@contextlib.contextmanager
def restored_on_error(model: nn.Module, values: bool = False) -> Iterator[None]:
    """Put ``model`` back as it was when the block raises: its module tree, hooks, attributes (every module's own
    dictionaries, restored in place) and ``requires_grad`` flags; with ``values``, its tensor values as well."""
    saved = [(m, {k: (v, _shallow_copy(v)) for k, v in vars(m).items()}) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    data = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]] if values else []
    try:
        yield
    except BaseException:
        for module, attributes in saved:
            for key in [k for k in vars(module) if k not in attributes]:
                del vars(module)[key]
            for key, (value, contents) in attributes.items():
                if isinstance(value, list):  # containers get their old contents back, in the same object
                    value[:] = contents
                elif contents is not None:
                    value.clear()
                    value.update(contents)
                vars(module)[key] = value
        for param, flag in flags:
            param.requires_grad_(flag)
        with torch.no_grad():
            for tensor, copy in data:
                tensor.copy_(copy)
        raise


def _shallow_copy(value: Any) -> Any:
    return copy.copy(value) if isinstance(value, (dict, list, set)) else None

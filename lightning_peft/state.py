"""Adapter state in memory: check it against a model, copy it in, and describe the methods that made it.

Everything here works on tensors and modules, never on files: :mod:`lightning_peft.adapter_files` writes and reads
them (and imports this module; this module imports nothing from there). The tensors themselves are collected by
:func:`lightning_peft.tensors.adapter_state_dict`.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import Adapter, adapters
from lightning_peft.errors import AdapterStateError, BaseModelMismatchError
from lightning_peft.injection import applied_methods
from lightning_peft.record import find_record
from lightning_peft.targets import SHORTCUTS, matches
from lightning_peft.tensors import adapter_tensors, base_name, clean_name
from lightning_peft.zero3 import gathered, global_shape


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
        base_name(name): list(global_shape(tensor))  # "a.base_layer.weight" -> "a.weight"
        for name, tensor in ((clean_name(n), t) for n, t in source.items())
        if name not in owned and isinstance(tensor, torch.Tensor)
    }


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
    parts = _counted([(reshaped, "{n} tensors differ in shape ({items})", "; "),
                      (missing, f"{{n}} base tensors of {source} are not in the model ({{items}})", ", "),
                      (extra, "{n} model tensors were not in the saved base ({items})", ", ")])
    if parts:
        raise BaseModelMismatchError(
            f"{source} was made for another base model: {'; '.join(parts)}. "
            "Load it into the same architecture and size it was trained on."
        )


def _counted(groups: list[tuple[list[str], str, str]]) -> list[str]:
    """``template`` filled with the count ``{n}`` and the first four ``{items}`` for each non-empty group of
    ``(items, template, separator)``: ``"3 tensors differ in shape (a; b; c)"``."""
    return [template.format(n=len(items), items=separator.join(items[:4])) for items, template, separator in groups
            if items]


def check_adapter_state(model: nn.Module, state: dict[str, Any], source: str = "the checkpoint") -> None:
    """Raise :class:`AdapterStateError` if ``state`` lacks adapter tensors of ``model`` or has other shapes."""
    expected = {name: tensor for name, tensor in adapter_tensors(model)}
    state = {clean_name(name): tensor for name, tensor in state.items()}  # as adapter_tensors names them
    missing = [n for n in expected if n not in state]
    reshaped = [
        f"{n}: saved {list(state[n].shape)}, model {list(global_shape(t))}"
        for n, t in expected.items() if n in state and tuple(state[n].shape) != tuple(global_shape(t))
    ]
    detail = _counted([(missing, "missing {n} adapter tensors ({items})", ", "),
                       (reshaped, "other shapes ({items})", "; ")])
    if detail:
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
    refuse_merged(model, source)
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
    with their rules rewritten for it (:func:`rules_within`), so the saved adapter loads into that module alone (a
    fresh ``transformers`` model, say) and adapts exactly the modules it adapted there.

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
        found.setdefault(origin.position, rules_within(model, origin.method.to_dict(), full[: len(full) - len(local)]))
    return [found[position] for position in sorted(found)]


_RULE_FIELDS = ("target_modules", "trainable_modules", "exclude_modules")  # rules that select module names
_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")  # {rule: value}; the first rule that matches wins


def rules_within(model: nn.Module, config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``config`` with its module rules, written for the root in which ``model`` sits at ``prefix`` (``"model."``),
    rewritten to select in ``model`` alone exactly the modules they selected in it there.

    A rule loses ``prefix`` where that selects the same modules (``"model.lin"`` -> ``"lin"``; suffix rules such as
    ``"ln_f"`` stay), and becomes a regex of the exact names where it would select more (``"model.lin"`` when
    ``model`` also has a ``block.lin``). Rules selecting nothing in ``model`` (a LightningModule's head) are left
    out; shortcuts (``"all-linear"``) and class names are kept as they are.

    Example:
        >>> model = nn.ModuleDict({"lin": nn.Linear(2, 2), "block": nn.ModuleDict({"lin": nn.Linear(2, 2)})})
        >>> rules_within(model, {"target_modules": ["model.lin", "block.lin"], "trainable_modules": ["head"]},
        ...              "model.")
        {'target_modules': ['(?:lin)', 'block.lin'], 'trainable_modules': None}
    """
    modules = [(name, module) for name, module in model.named_modules() if name]
    out = dict(config)
    for key in _RULE_FIELDS:
        rules = config.get(key)
        if isinstance(rules, str):
            kept = [_rule_within(modules, rules, prefix, entry=False)]
        elif isinstance(rules, list):
            kept = [_rule_within(modules, rule, prefix) for rule in rules]
        else:
            continue
        found = [rule for rule in kept if rule is not None]
        if key == "target_modules" and not found:
            continue  # nothing to aim at here: loading says which rule matched nothing
        out[key] = None if not found else found[0] if isinstance(rules, str) else found
    for key in _PATTERN_FIELDS:
        pattern: dict[str, Any] = {}
        for rule, value in (config.get(key) or {}).items():
            inside = _rule_within(modules, rule, prefix)
            if inside is not None and inside not in pattern:  # as before, the first rule for a module wins
                pattern[inside] = value
        if key in config:
            out[key] = pattern
    return out


def _rule_within(modules: list[tuple[str, nn.Module]], rule: Any, prefix: str, entry: bool = True) -> Any:
    """One rule (a list ``entry``, or a whole-string regex) for the sub-module at ``prefix``; ``None`` where it
    selects nothing there."""
    if not isinstance(rule, str) or rule in SHORTCUTS:
        return rule

    def chosen(candidate: str, above: str) -> set[str]:
        return {name for name, module in modules if matches([candidate] if entry else candidate, above + name, module)}

    selected = chosen(rule, prefix)
    if not selected:
        return None
    short = rule[len(prefix):] if rule.startswith(prefix) else rule
    return short if chosen(short, "") == selected else "|".join(f"(?:{re.escape(n)})" for n in sorted(selected))


def relative_rules(method: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A method configuration whose rules (target, trainable, exclude) written as full names under ``prefix``
    are made relative to the module at ``prefix`` (``"model."``)."""
    out = dict(method)
    for key in ("target_modules", "trainable_modules", "exclude_modules"):
        rules = out.get(key)
        if prefix and isinstance(rules, list):
            out[key] = [r[len(prefix):] if isinstance(r, str) and r.startswith(prefix) else r for r in rules]
    return out


def check_tensor_values(state: dict[str, torch.Tensor], source: str = "the adapter state") -> None:
    """Raise :class:`AdapterStateError` for saved tensors holding NaN or infinity (a diverged run)."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterStateError(
            f"{source} holds NaN or infinite values in {len(bad)} tensors ({', '.join(bad[:4])}): the run that saved "
            "it diverged. Load an earlier checkpoint, or lower the learning rate and train again."
        )


def refuse_merged(model: nn.Module, source: str) -> None:
    """Raise :class:`AdapterStateError` if the adapters of ``model`` are merged: loading would keep the old update."""
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

"""Find the modules a method adapts: by name, dotted suffix, regex, module type or a shortcut.

One selection function serves every method. A rule is

* a shortcut: ``"all-linear"`` (every ``nn.Linear`` and transformers ``Conv1D`` except output heads: modules
  named as in :data:`HEAD_NAMES` or inside one, and a transformers model's ``get_output_embeddings()``) or
  ``"all-conv"`` (every ``nn.Conv1d/2d/3d``);
* a single string that is not a shortcut: a regular expression that must match the *whole* module name
  (``r"backbone\\.layer[34]\\..*conv\\d"``);
* a list whose entries are each an exact name, a dotted suffix (``"query"`` matches
  ``"encoder.layer.0.attention.self.query"``), a full-match regex, a module class, or a class name
  (``"Conv2d"``, ``"torch.nn.modules.conv.Conv2d"``); classes and class names also select subclasses.

Selections that match nothing raise :class:`TargetNotFoundError` naming the closest module names and types.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Sequence

from torch import nn

from lightning_peft.errors import TargetNotFoundError
from lightning_peft.imported import imported_class
from lightning_peft.tensors import base_name

TargetRule = str | type[nn.Module]
Targets = str | Sequence[TargetRule]

#: Last name components treated as output heads by ``"all-linear"`` (train them with ``trainable_modules``).
HEAD_NAMES = frozenset({"lm_head", "classifier", "head", "heads", "fc", "score", "output_layer", "qa_outputs"})
SHORTCUTS = ("all-linear", "all-conv")


def transformers_conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class if transformers is already imported (it is never imported here)."""
    return imported_class("transformers.pytorch_utils", "Conv1D")


def linear_types() -> tuple[type[nn.Module], ...]:
    """The module types ``"all-linear"`` selects."""
    conv1d = transformers_conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def conv_types() -> tuple[type[nn.Module], ...]:
    """The module types ``"all-conv"`` selects."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches_rule(rule: TargetRule, name: str, module: nn.Module) -> bool:
    if isinstance(rule, type):
        return isinstance(module, rule)
    if any(rule in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}") for cls in type(module).__mro__):
        return True  # a class name selects subclasses, as a class does (and as saved configs spell classes)
    return _matches_name(rule, name)


def _matches_name(rule: str, name: str) -> bool:
    """An exact name, a dotted suffix or a full-match regex (an invalid regex matches nothing)."""
    if name == rule or name.endswith("." + rule):
        return True
    try:
        return re.fullmatch(rule, name) is not None
    except re.error:
        return False


def matches(rules: Targets, name: str, module: nn.Module, heads: Collection[str] = ()) -> bool:
    """Whether ``name``/``module`` is selected by ``rules`` (see the module docstring for the syntax).

    ``heads`` are extra output-head names that ``"all-linear"`` skips (see :func:`output_heads`).
    """
    if isinstance(rules, str):
        if rules == "all-linear":
            return isinstance(module, linear_types()) and not is_output_head(name) and name not in heads
        if rules == "all-conv":
            return isinstance(module, conv_types())
        return re.fullmatch(rules, name) is not None
    return any(
        matches(rule, name, module, heads) if rule in SHORTCUTS else _matches_rule(rule, name, module)
        for rule in rules
    )


def is_output_head(name: str) -> bool:
    """Whether a module name looks like an output head (its name or a parent's is in :data:`HEAD_NAMES`)."""
    return any(part in HEAD_NAMES for part in name.split("."))


def output_heads(model: nn.Module) -> set[str]:
    """Names of the modules that transformers models in ``model`` return from ``get_output_embeddings()``."""
    heads = set()
    for sub in model.modules():
        get_head = getattr(sub, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, nn.Module):
            heads |= {name for name, m in model.named_modules() if m is head}
    return heads


def is_inside(name: str, outers: Iterable[str]) -> bool:
    """Whether the module ``name`` lies below one of the modules ``outers`` (``""``, the root, holds them all)."""
    return any(outer == "" or name.startswith(f"{outer}.") for outer in outers)


def layer_index(name: str, layers_pattern: str | None = None) -> int | None:
    """The layer number in a module name: the integer after ``layers_pattern``, else the first integer part.

    Example:
        >>> layer_index("encoder.layer.3.attention.query"), layer_index("blocks.0.mlp.2", layers_pattern="mlp")
        (3, 2)
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if not part.isdigit():
            continue
        if layers_pattern is None or (i > 0 and re.fullmatch(layers_pattern, parts[i - 1])):
            return int(part)
    return None


def _excluded(name: str, exclude: Targets | None, modules: dict[str, nn.Module]) -> bool:
    if not exclude:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]  # the module and its ancestors
    return any(matches(exclude, prefix, modules[prefix]) for prefix in prefixes)


def describe(model: nn.Module, names: Iterable[str], limit: int = 8) -> str:
    """``"name (Type), ..."`` for the first ``limit`` names."""
    modules = dict(model.named_modules())
    shown = [f"{n} ({_kind(type(modules[n]))})" for n in list(names)[:limit]]
    return ", ".join(shown) if shown else "<none>"


def _kind(cls: type) -> str:
    """A class's name, in full where it would pass for a torch.nn class it is not (a quantized ``Linear``)."""
    return f"{cls.__module__}.{cls.__qualname__}" if getattr(nn, cls.__name__, cls) is not cls else cls.__name__


def closest_names(model: nn.Module, rules: Targets, candidates: Sequence[str], limit: int = 6) -> list[str]:
    """Candidate module names closest to the given rules (by full name, last part or type), for error messages."""
    words = [rules] if isinstance(rules, str) else [r if isinstance(r, str) else r.__name__ for r in rules]
    modules = dict(model.named_modules())

    def score(name: str) -> float:
        keys = (name, name.rsplit(".", 1)[-1], type(modules[name]).__name__)
        return max(difflib.SequenceMatcher(None, w, k).ratio() for w in words for k in keys)

    scores = {name: score(name) for name in candidates}
    ranked = sorted(candidates, key=scores.__getitem__, reverse=True)  # stable: ties keep the model's order
    close = [name for name in ranked[:limit] if scores[name] >= 0.4]
    return close or list(candidates)[:limit]


def select_modules(
    model: nn.Module,
    targets: Targets | None,
    *,
    candidates: Sequence[tuple[str, nn.Module]],
    kinds: str,
    exclude: Targets | None = None,
    layers: Sequence[int] | None = None,
    layers_pattern: str | None = None,
    method: str = "this method",
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for every one of ``candidates`` selected by the rules, in model order.

    The one selection every method uses: a method passes what it can adapt (its layer types, the attention modules
    it found), the user's rules pick among them.

    Args:
        model: The model to search.
        targets: Selection rules (see the module docstring); ``None`` selects every candidate.
        candidates: ``(name, module)`` the method can adapt.
        kinds: What the candidates are, for error messages (``"Linear, Conv2d"``, ``"attention modules"``).
        exclude: Rules for modules to skip; a module is skipped if it or any parent matches.
        layers: Keep only modules whose layer index (see :func:`layer_index`) is in this list.
        layers_pattern: Regex for the container name before the layer index (``"layer"``, ``"h"``, ``"blocks"``).
        method: Method name used in error messages.

    Raises:
        TargetNotFoundError: A rule matched nothing, matched only modules the method cannot adapt, or the filters
            left nothing.
        ValueError: A single-string rule is not a valid regular expression.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> adaptable = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        >>> [name for name, _ in select_modules(model, "all-conv", candidates=adaptable, kinds="Conv2d, Linear")]
        ['0', '2']
        >>> [name for name, _ in select_modules(model, ["4", nn.Conv2d], candidates=adaptable, kinds="Conv2d, Linear")]
        ['0', '2', '4']
    """
    _check_regex(targets, "target_modules")
    _check_regex(exclude, "exclude_modules")
    modules = {name: module for name, module in model.named_modules() if name}
    adaptable = dict(candidates)
    candidate_names = list(adaptable)
    heads = output_heads(model)
    wanted = None if layers is None else set(layers)
    filters = [f"exclude_modules={_show(exclude)}"] if exclude else []
    filters += [f"layers={list(layers)}"] if layers is not None else []
    after = f" after {' and '.join(filters)}" if filters else ""

    def kept(name: str) -> bool:
        return not _excluded(name, exclude, modules) and (wanted is None or layer_index(name, layers_pattern) in wanted)

    if targets is None:
        selected = {name for name in candidate_names if kept(name)}
        if not selected:
            raise TargetNotFoundError(
                f"{method} found {kinds} in {type(model).__name__} ({describe(model, candidate_names)}), but none is "
                f"left{after}. Loosen the filters."
            )
        return [(name, module) for name, module in model.named_modules() if name in selected]  # the root too
    rules: list[Targets] = [targets] if isinstance(targets, str) else [[rule] for rule in targets]
    chosen: set[str] = set()
    for rule in rules:  # every rule of a list must select something adaptable
        # also by the base model's name: a layer inside a prompt or prefix adapter is still the layer the user named
        hits = [name for name, module in modules.items() if kept(name) and (
            matches(rule, name, module, heads) or matches(rule, base_name(name), module, heads))]
        adaptable_hits = [name for name in hits if name in adaptable]
        if hits and not adaptable_hits:
            raise TargetNotFoundError(
                f"target_modules={_show(rule)} selected {describe(model, hits)}, which {method} cannot adapt (it "
                f"adapts {kinds}). Closest adaptable modules: "
                f"{describe(model, closest_names(model, rule, candidate_names))}. "
                "Select those, or register an adapter for the type."
            )
        if not adaptable_hits:
            raise TargetNotFoundError(
                f"target_modules={_show(rule)} matched nothing in {type(model).__name__}{after}. "
                f"Closest module names: {describe(model, closest_names(model, rule, candidate_names))}. "
                "Pass exact names, dotted suffixes, a full-match regex, a module type, 'all-linear' or 'all-conv'."
            )
        chosen.update(adaptable_hits)
    return [(name, module) for name, module in modules.items() if name in chosen]


def outermost(selected: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The entries of ``selected`` that lie inside no other entry (one adapter per sub-tree: the outermost wins)."""
    names = [n for n, _ in selected]
    return [(n, m) for n, m in selected if not is_inside(n, (p for p in names if p != n))]


def select_parameters(model: nn.Module, rules: Sequence[str], *, what: str = "target_parameters"
                      ) -> list[tuple[str, str]]:
    """``(module name, local name)`` of every parameter whose full name a rule selects (an exact name, a dotted suffix
    such as ``"experts.gate_up_proj"``, or a full-match regex), in model order.

    Raises:
        TargetNotFoundError: A rule matches no parameter; the message names the closest parameter names.
    """
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for rule in rules:
        hits = [name for name in names if _matches_name(rule, name)]
        if not hits:
            close = difflib.get_close_matches(rule, names, n=6, cutoff=0.3) or [
                n for n in names if n.rsplit(".", 1)[-1] in rule or rule.rsplit(".", 1)[-1] in n][:6]
            raise TargetNotFoundError(
                f"{what}={rule!r} matched no parameter of {type(model).__name__}. Closest parameter names: "
                f"{', '.join(close) or '<none>'}. Pass full names, dotted suffixes or a full-match regex."
            )
        chosen.update(hits)
    return [(owner, local) for owner, _, local in (name.rpartition(".") for name in names if name in chosen)]


def _check_regex(rules: Targets | None, what: str) -> None:
    if isinstance(rules, str) and rules not in SHORTCUTS:
        try:
            re.compile(rules)
        except re.error as err:
            raise ValueError(
                f"{what}={rules!r} is a single string, so it is read as a regular expression, and it is not a "
                f"valid one ({err}). Pass a list of names (['{rules}']) or fix the pattern."
            ) from None


def select_names(model: nn.Module, rules: Targets, *, what: str = "trainable_modules") -> list[str]:
    """Names of all modules matching ``rules`` (any type), in model order; raises naming a rule (every entry of a
    list, as for ``target_modules``) that matches nothing."""
    _check_regex(rules, what)
    heads = output_heads(model)
    modules = [(name, module) for name, module in model.named_modules() if name]
    selected: set[str] = set()
    for rule in [rules] if isinstance(rules, str) else [[rule] for rule in rules]:
        names = {name for name, module in modules if matches(rule, name, module, heads)}
        if not names:
            raise TargetNotFoundError(
                f"{what}={_show(rule)} matched nothing in {type(model).__name__}. "
                f"Closest module names: {describe(model, closest_names(model, rule, [n for n, _ in modules]))}."
            )
        selected |= names
    return [name for name, _ in modules if name in selected]


def _show(rules: Targets) -> str:
    if isinstance(rules, str):
        return repr(rules)
    return repr([r if isinstance(r, str) else r.__name__ for r in rules])

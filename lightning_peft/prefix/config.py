r"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) for any attention layer: per layer, ``p``
learned keys and values per key/value head, prepended along the sequence axis after the key/value projections (and
rotary embeddings). Queries, outputs and every other shape stay as they were; masks gain ``p`` visible columns; a KV
cache holds real tokens only. Which modules are attention: the handlers of :mod:`lightning_peft.prefix.attention`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from lightning_peft.adapter import Adapter, adapters
from lightning_peft.errors import PEFTWarning, TargetNotFoundError
from lightning_peft.methods import Site, TargetedConfig, check_positive_int, init_seed
from lightning_peft.prefix.attention import AttentionMatch, match_attention
from lightning_peft.prefix.attention.base import PrefixAttention, PrefixEncoder, prefix_undefined
from lightning_peft.prefix.attention.sdpa import sdpa_shape_hint
from lightning_peft.record import find_record
from lightning_peft.targets import is_inside
from lightning_peft.tensors import refresh_trainable


@dataclass(eq=False)
class PrefixTuningConfig(TargetedConfig):
    """Configuration of prefix tuning; ``PrefixTuning`` (the callback) takes the same arguments.

    Args:
        num_tokens: Prefix length ``p`` per layer (the paper uses 10 for table-to-text, 200 for summarisation).
        reparameterize: Produce every layer's prefix with one shared MLP while training (paper §4.3, more
            stable); :func:`fold_prefix` turns it into plain prefix tensors afterwards with identical outputs.
        hidden_size: Width of the reparameterization MLP (its input embedding and hidden layer; paper: 512).
        gate: Exact start: give the prefix its own softmax, added through a zero-initialised gate
            (``tanh(g)``, as LLaMA-Adapter), so the model equals the frozen one at step 0.
        init_std: Standard deviation of the prefix's (or the MLP's input embedding's) normal initialisation.
        target_modules: Only attention modules matching these rules (names, dotted suffixes, a regex, class
            names; see :mod:`lightning_peft.targets`); every attention module found by default. ``exclude_modules``,
            ``layers`` (only attention layers whose index is in this list) and ``layers_pattern`` filter further,
            as for LoRA; they and the fields every method has (``trainable_modules``, ``batchnorm``, ``seed``,
            ``adapter_dtype``) are keyword-only (see :class:`~lightning_peft.methods.TargetedConfig`).
    """

    method_name: ClassVar[str] = "prefix"
    label: ClassVar[str] = "prefix tuning"
    num_tokens: int = 10
    reparameterize: bool = False
    hidden_size: int = 512
    gate: bool = False
    init_std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("PrefixTuning num_tokens", self.num_tokens, "prefix tokens")
        check_positive_int("PrefixTuning hidden_size", self.hidden_size)
        if not 0 <= self.init_std < float("inf"):
            raise ValueError(f"PrefixTuning init_std must be a finite number >= 0; got {self.init_std!r}.")
        if self.gate and self.init_std == 0 and not self.reparameterize:
            raise ValueError(
                "PrefixTuning(gate=True, init_std=0) never learns: the gate starts at 0 and the prefixes at 0, so "
                "neither gets a gradient. Keep init_std > 0 (default 1.0)."
            )

    def sites(self, model: nn.Module) -> list[Site[AttentionMatch]]:
        """Every selected attention module a registered handler knows.

        Raises:
            TargetNotFoundError: The model has no attention module a handler knows, or the filters left none.
        """
        found = find_attention(model)
        if not found and any(isinstance(a, PrefixAttention) for _, a in adapters(model)):
            raise ValueError(
                f"every attention module of {type(model).__name__} already has a prefix; a second one would never be "
                "read. Call unload(model) first, or keep several with add_adapter/set_adapter."
            )
        if not found:
            raise TargetNotFoundError(_no_attention_message(model))
        left = _unhandled_attention(model, [name for name, _ in found])
        if left:
            warnings.warn(
                f"prefix tuning adapts {len(found)} attention layers of {type(model).__name__} but not "
                f"{len(left)} others that look like attention and no handler knows: "
                f"{', '.join(sorted({_class_name(m) for _, m in left})[:4])} (e.g. {left[0][0]!r}). They keep "
                "running without a prefix; teach them with lightning_peft.register_attention_handler.",
                PEFTWarning, stacklevel=3)
        matches = dict(found)
        candidates = [(name, model.get_submodule(name)) for name, _ in found]
        return [Site(name, module, matches[name])
                for name, module in self.select(model, candidates, "attention modules")]

    def build(self, model: nn.Module, site: Site[AttentionMatch], seed: int) -> PrefixAttention:
        """Wrap the attention module in its handler's prefix adapter."""
        return site.detail.adapter(site.module, site.detail.shape, self.num_tokens, gate=self.gate,
                                   init_std=self.init_std, seed=seed)

    def finish(self, model: nn.Module, built: list[tuple[str, Adapter]]) -> None:
        """Share one MLP among the prefixes (``reparameterize``)."""
        prefixes = [a for _, a in built if isinstance(a, PrefixAttention)]
        if self.reparameterize and prefixes:
            _share_encoder(prefixes, self.hidden_size, init_seed(self.seed, "prefix_encoder"))


def find_attention(model: nn.Module) -> list[tuple[str, AttentionMatch]]:
    """``(name, match)`` for every outermost module a registered attention handler knows, in module order.

    Attention already holding a prefix is left out (a second prefix would never be read); attention inside
    another adapter (LoRA on ``nn.MultiheadAttention``) is found, so the two compose."""
    found: list[tuple[str, AttentionMatch]] = []
    covered = [f"{name}." for name, module in model.named_modules() if isinstance(module, PrefixAttention)]
    for name, module in model.named_modules():
        if isinstance(module, Adapter) or name.startswith(tuple(covered)):
            continue
        match = match_attention(module)
        if match is not None:
            found.append((name, match))
            if name:
                covered.append(f"{name}.")
    return found


def _share_encoder(built: list[PrefixAttention], hidden_size: int, seed: int) -> None:
    ref = built[0].prefix_keys
    total = sum(a.shape.numel_per_token for a in built)
    encoder = PrefixEncoder(built[0].num_tokens, hidden_size, total, seed, device=ref.device, dtype=ref.dtype)
    start = 0
    for i, adapter in enumerate(built):
        adapter.use_encoder(encoder, start, owner=i == 0)
        start += adapter.shape.numel_per_token


#: Class names that look like attention; such a module no handler knows is named in the refusal.
_ATTENTION_LIKE = re.compile(r"attention|attn", re.IGNORECASE)


def _no_attention_message(model: nn.Module) -> str:
    reasons = {reason for reason in map(prefix_undefined, model.modules()) if reason is not None}
    if reasons:  # attention of a kind whose definition leaves no place for a prefix (EdgeNeXt's XCA)
        return (
            f"prefix tuning is not defined for {type(model).__name__}: {'; '.join(sorted(reasons))}. "
            "Use LoRA (LoRA(target_modules='all-linear') adapts its qkv and projections) or PromptTuning instead."
        )
    unknown = _unhandled_attention(model, [])
    if unknown:
        classes = sorted({_class_name(m) for _, m in unknown})
        return (
            f"prefix tuning has no handler for the attention layers of {type(model).__name__}: "
            f"{', '.join(classes[:4])} (e.g. {unknown[0][0]!r}, {len(unknown)} layers). Teach it with "
            "lightning_peft.register_attention_handler (a handler returns AttentionMatch(adapter, PrefixShape)), "
            f"or use LoRA or PromptTuning, which apply to any model.{sdpa_shape_hint(model.modules())}"
        )
    kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    return (
        f"prefix tuning found no attention layer in {type(model).__name__} (its layers: {', '.join(kinds[:8])}). "
        "Prefixes are keys and values for attention; for a model without attention use LoRA "
        "(LoRA(target_modules='all-conv') for a CNN) or pixel prompts (PromptTuning). If the model has an "
        "attention class of its own, teach it with lightning_peft.register_attention_handler."
        + sdpa_shape_hint(model.modules())
    )


def _unhandled_attention(model: nn.Module, handled: list[str]) -> list[tuple[str, nn.Module]]:
    """Innermost modules whose class name looks like attention, outside and around none of ``handled`` (nor of
    an adapter already there)."""
    handled = [*handled, *(name for name, m in model.named_modules() if isinstance(m, Adapter))]
    return [(name, module) for name, module in model.named_modules()
            if name and _ATTENTION_LIKE.search(type(module).__name__) and not isinstance(module, Adapter)
            and name not in handled and not is_inside(name, handled) and not any(is_inside(h, [name]) for h in handled)
            and not any(m is not module and _ATTENTION_LIKE.search(type(m).__name__) for m in module.modules())]


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def fold_prefix(model: nn.Module) -> nn.Module:
    """Fold the reparameterization MLP away: every layer keeps the plain prefix it produces now; returns ``model``.

    Outputs stay identical; the adapter state then holds ``prefix_keys``/``prefix_values`` per layer only, and
    the recorded configuration says ``reparameterize=False`` so saved adapters load into a plain injection.

    Example:
        >>> from lightning_peft import inject
        >>> model = inject(nn.TransformerEncoderLayer(8, 2), PrefixTuningConfig(num_tokens=2, reparameterize=True,
        ...                hidden_size=4))
        >>> sorted(n for n, p in fold_prefix(model).named_parameters() if p.requires_grad)
        ['self_attn.prefix_keys', 'self_attn.prefix_values']
    """
    for _, adapter in adapters(model):
        if isinstance(adapter, PrefixAttention):
            adapter.fold()
    methods = getattr(find_record(model), "methods", [])
    for i, method in enumerate(methods):
        if isinstance(method, PrefixTuningConfig) and method.reparameterize:
            methods[i] = dataclasses.replace(method, reparameterize=False)
    refresh_trainable(model)
    return model


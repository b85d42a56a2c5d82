"""The prefix adapter every attention family shares, and the attention arithmetic with a prefix.

A prefix is ``p`` learned keys and values per key/value head, prepended along the sequence axis *after* the
key/value projections (and after rotary embeddings)::

    q: (b, h, n, d)      k, v: (b, h_kv, n_kv, d)   ──►   k', v': (b, h_kv, p + n_kv, d)
    scores = q k'^T: (b, h, n, p + n_kv)      output = softmax(scores) v': (b, h, n, d)

With ``gate`` (exact start, as LLaMA-Adapter): ``output = attn(q, k, v) + tanh(g) · attn(q, P_k, P_v)``, ``g = 0``
at init.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapter import Adapter
from lightning_peft.imported import imported_class
from lightning_peft.participation import took_part


@dataclass(frozen=True)
class PrefixShape:
    """Sizes of one attention layer's prefix: key/value heads and per-head key and value widths."""

    kv_heads: int
    key_dim: int
    value_dim: int

    @property
    def numel_per_token(self) -> int:
        """Numbers one prefix position holds in this layer (its keys and values over all heads)."""
        return self.kv_heads * (self.key_dim + self.value_dim)


@dataclass(frozen=True)
class AttentionClass:
    """One attention class of an optional library (looked up once its module is imported), the adapter that wraps
    it (shape: :func:`attribute_shape`), and whether subclasses match too."""

    module: str
    name: str
    adapter: type[PrefixAttention]
    subclasses: bool = False


HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
KV_HEAD_ATTRIBUTES = ("num_kv_heads", "num_key_value_heads", "n_kv_heads")
HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "head_dimension",
                       "dim_head", "key_dim")
VALUE_DIM_ATTRIBUTES = ("val_dim", "value_dim")
WIDTH_ATTRIBUTES = ("embed_dim", "dim", "hidden_size", "d_model", "n_embd")


def int_attribute(objects: list[Any], names: tuple[str, ...]) -> int | None:
    """The first positive ``int`` attribute of ``objects`` among ``names`` (objects first, then names)."""
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def read_shape(module: nn.Module) -> PrefixShape | None:
    """An attention module's prefix shape read from its attributes (the names above; heads and width also from its
    ``config``, transformers' text config), or ``None`` if they do not say. Key/value heads: heads over
    ``num_key_value_groups``, else a ``KV_HEAD_ATTRIBUTES`` name, else the heads. Head width: a
    ``HEAD_DIM_ATTRIBUTES`` name, else the width over the heads, else a fused ``qkv`` linear's outputs over 3 heads.
    """
    config: Any = getattr(module, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sources = [module] if config is None else [module, config]
    heads = int_attribute(sources, HEAD_ATTRIBUTES)
    if heads is None:
        return None
    groups = int_attribute([module], ("num_key_value_groups",))
    kv_heads = heads // groups if groups else int_attribute([module], KV_HEAD_ATTRIBUTES) or heads
    head_dim = int_attribute([module], HEAD_DIM_ATTRIBUTES)
    width = int_attribute(sources, WIDTH_ATTRIBUTES)
    if head_dim is None and width is not None and width % heads == 0:
        head_dim = width // heads
    qkv = getattr(module, "qkv", None)
    if head_dim is None and isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
        head_dim = qkv.out_features // (3 * heads)  # a fused projection of queries, keys and values
    if head_dim is None or heads % kv_heads:
        return None
    return PrefixShape(kv_heads, head_dim, int_attribute([module], VALUE_DIM_ATTRIBUTES) or head_dim)


def attribute_shape(module: nn.Module) -> PrefixShape:
    """:func:`read_shape`, or a ``ValueError`` naming the module and the fix."""
    shape = read_shape(module)
    if shape is None:
        raise ValueError(
            f"cannot read the number of heads or the head width of {type(module).__name__} from its attributes "
            f"(tried {', '.join(HEAD_ATTRIBUTES)}; {', '.join(HEAD_DIM_ATTRIBUTES)}); set them, or register a "
            "handler for it with lightning_peft.register_attention_handler."
        )
    return shape


def loaded_names(function: Any) -> set[str]:
    """The global and attribute names ``function``'s code, and the functions defined inside it, load (through
    decorators; empty for anything without code)."""
    function = function.__func__ if isinstance(function, (staticmethod, classmethod)) else function
    code = getattr(inspect.unwrap(function), "__code__", None) if callable(function) else None
    return set() if code is None else _code_names(code)


def _code_names(code: CodeType) -> set[str]:
    nested = (_code_names(const) for const in code.co_consts if isinstance(const, CodeType))
    return set(code.co_names).union(*nested)


class PrefixEncoder(nn.Module):
    """Reparameterization (Li & Liang 2021, §4.3): one MLP that produces every layer's prefix while training.

    ``embedding (p, hidden) → Linear(hidden, hidden) → tanh → Linear(hidden, Σ_layers h_kv·(d_k + d_v))``.
    Layers read their own rows of the last linear, so each layer computes only its slice. Weights are plain
    parameters (no ``nn.Linear``), so precision plugins that replace linears leave them alone.
    """

    def __init__(self, num_tokens: int, hidden_size: int, out_features: int, seed: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.embedding = nn.Parameter(torch.empty(num_tokens, hidden_size, device=device, dtype=dtype))
        self.weight_in = nn.Parameter(torch.empty(hidden_size, hidden_size, device=device, dtype=dtype))
        self.bias_in = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.weight_out = nn.Parameter(torch.empty(out_features, hidden_size, device=device, dtype=dtype))
        self.bias_out = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding normal(0, 1) (``nn.Embedding``'s default, as PEFT), linears as ``nn.Linear``; seeded."""
        if self.embedding.is_meta:
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.embedding.copy_(torch.randn(self.embedding.shape, generator=generator))
        for weight, bias in ((self.weight_in, self.bias_in), (self.weight_out, self.bias_out)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))
            bias.copy_(torch.empty(bias.shape).uniform_(-bound, bound, generator=generator))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Output features ``start:stop`` for every prefix position: ``(p, stop - start)``."""
        hidden = torch.tanh(F.linear(self.embedding, self.weight_in, self.bias_in))
        return F.linear(hidden, self.weight_out[start:stop], self.bias_out[start:stop])


class PrefixAttention(Adapter):
    """Prefix tuning for one attention layer: owns ``prefix_keys``/``prefix_values`` (or reads a shared encoder);
    subclasses (one per attention family) decide where the prefix enters.

    Args:
        base: The attention module; it stays the ``base_layer`` child, unchanged.
        shape: Heads and widths of this layer's keys and values.
        num_tokens: Prefix length ``p``.
        gate: Add a zero-initialised gate (exact start) instead of one softmax over prefix and tokens.
        init_std: Standard deviation of the prefix's normal initialisation (1.0: ``nn.Embedding``'s, as PEFT).
        seed: Seed of this layer's initialisation (derived from its name, so every process agrees).
    """

    reports_participation: ClassVar[bool] = True

    def __init__(self, base: nn.Module, shape: PrefixShape, num_tokens: int, gate: bool = False,
                 init_std: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.base_layer = base
        self.shape = shape
        self.num_tokens = num_tokens
        self.init_std = init_std
        self.seed = seed
        self._encoder: PrefixEncoder | None = None  # shared, registered on one layer only (see use_encoder)
        self._rows = (0, 0)
        ref = next(iter(base.parameters()), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        self.prefix_keys = nn.Parameter(
            torch.empty(shape.kv_heads, num_tokens, shape.key_dim, device=device, dtype=dtype)
        )
        self.prefix_values = nn.Parameter(
            torch.empty(shape.kv_heads, num_tokens, shape.value_dim, device=device, dtype=dtype)
        )
        self.prefix_gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype)) if gate else None
        self.reset_parameters()

    @property
    def gated(self) -> bool:
        return self.prefix_gate is not None

    def use_encoder(self, encoder: PrefixEncoder, start: int, owner: bool) -> None:
        """Read this layer's prefix from rows ``start:start + p·…`` of a shared encoder (reparameterization)."""
        del self.prefix_keys, self.prefix_values
        self.__dict__["_encoder"] = encoder  # a plain reference: the encoder is registered on its owner only
        if owner:
            self.prefix_encoder = encoder
        self._rows = (start, start + self.shape.numel_per_token)

    def fold(self) -> None:
        """Replace the encoder by the plain prefix tensors it currently produces (identical outputs)."""
        encoder = self.__dict__.get("_encoder")
        if encoder is None:
            return
        with torch.no_grad():
            keys, values = self._prefix_tensors()
        self.__dict__["_encoder"] = None
        self._modules.pop("prefix_encoder", None)
        self.prefix_keys = nn.Parameter(keys.detach().clone())
        self.prefix_values = nn.Parameter(values.detach().clone())

    def _prefix_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        took_part(self)
        encoder = self.__dict__.get("_encoder")
        if encoder is None:
            return self.prefix_keys, self.prefix_values
        s = self.shape
        rows = encoder.rows(*self._rows).reshape(self.num_tokens, s.kv_heads, s.key_dim + s.value_dim)
        rows = rows.transpose(0, 1)  # (h_kv, p, d_k + d_v)
        return rows[..., : s.key_dim], rows[..., s.key_dim:]

    def prefix_like(self, key: torch.Tensor, value: torch.Tensor,
                    heads_axis: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix as ``(..., h, ..., p, d)`` beside ``key``/``value`` ``(..., h, ..., s, d)``, in their dtype.

        ``h`` (on ``heads_axis``: -3, or -4 before a windows axis, each window seeing the same prefix) is the
        layer's key/value heads, or a multiple: heads repeated for grouped-query attention (``repeat_kv``).
        """
        keys, values = self._prefix_tensors()  # (h_kv, p, d)
        groups = key.shape[heads_axis] // self.shape.kv_heads
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=0), values.repeat_interleave(groups, dim=0)
        between = [1] * (-heads_axis - 3)
        keys = keys.to(key.dtype).view(keys.shape[0], *between, *keys.shape[1:])
        values = values.to(value.dtype).view(values.shape[0], *between, *values.shape[1:])
        return keys.expand(*key.shape[:-2], -1, -1), values.expand(*value.shape[:-2], -1, -1)

    def prepend(self, key: torch.Tensor, value: torch.Tensor,
                heads_axis: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
        """``[P_k; key]`` and ``[P_v; value]`` along the sequence axis: the one place a prefix joins the keys."""
        prefix_key, prefix_value = self.prefix_like(key, value, heads_axis)
        return torch.cat([prefix_key, key], dim=-2), torch.cat([prefix_value, value], dim=-2)

    def check_keys(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Raise unless ``key``/``value`` ``(b, heads, s, d)`` have this layer's key/value heads (or a multiple of
        them: repeated) and widths, the shape the prefix was built with."""
        s = self.shape
        if key.shape[1] % s.kv_heads or key.shape[-1] != s.key_dim or value.shape[-1] != s.value_dim:
            raise ValueError(
                f"{type(self.base_layer).__name__} attends over keys of shape {tuple(key.shape)} (values "
                f"{tuple(value.shape)}), but its prefix was built for {s.kv_heads} key/value heads of width "
                f"{s.key_dim} (values {s.value_dim}) from the module's attributes. Register a handler for this class "
                "with lightning_peft.register_attention_handler that returns the right PrefixShape."
            )

    def gate_value(self, like: torch.Tensor) -> torch.Tensor:
        """``tanh(g)``: the weight of the gated prefix branch."""
        assert self.prefix_gate is not None  # internal invariant: called on gated adapters only
        return torch.tanh(self.prefix_gate).to(like.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Prefix normal(0, ``init_std``), seeded per layer; the gate (exact start) back to zero."""
        if self.prefix_gate is not None:
            self.prefix_gate.zero_()
        if "prefix_keys" not in self._parameters or self.prefix_keys.is_meta:
            return  # reparameterized: the encoder resets itself
        generator = torch.Generator().manual_seed(self.seed)
        self.prefix_keys.copy_(torch.randn(self.prefix_keys.shape, generator=generator) * self.init_std)
        self.prefix_values.copy_(torch.randn(self.prefix_values.shape, generator=generator) * self.init_std)

    def extra_repr(self) -> str:
        s = self.shape
        mode = "reparameterized" if self.__dict__.get("_encoder") is not None else "plain"
        return f"num_tokens={self.num_tokens}, kv_heads={s.kv_heads}, key_dim={s.key_dim}, {mode}, gate={self.gated}"


def causal_bias(q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor:
    """``(q, kv)`` additive mask: query ``i`` (the last ``q`` of ``kv`` positions) sees keys ``j <= i + kv - q``."""
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=like.device).tril(kv_len - q_len)
    return torch.zeros(q_len, kv_len, dtype=like.dtype, device=like.device).masked_fill(~allowed, float("-inf"))


def pad_columns(mask: torch.Tensor, before: int) -> torch.Tensor:
    """``before`` always-visible columns (True in a bool mask, 0 in an additive one) in front of the last axis."""
    fill = mask.new_full([*mask.shape[:-1], before], True if mask.dtype == torch.bool else 0.0)
    return torch.cat([fill, mask], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, *, dropout: float,
           scale: float | None, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with an additive ``bias``; explicit when the weights are wanted."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale), None
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
    return weights @ v, weights


def prefixed_attention(adapter: PrefixAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None, *, dropout: float = 0.0, scale: float | None = None,
                       need_weights: bool = False, key_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q (b, h, n, d)`` over the adapter's prefix and ``k, v (b, h, s, d)``.

    ``bias`` is an additive mask broadcastable to ``(b, h, n, s)`` (real keys only). ``key_norm`` transforms every
    key row before scoring, the prefix's included (cosine attention normalizes them). Returns the output
    ``(b, h, n, d_v)`` and, with ``need_weights``, weights ``(b, h, n, p + s)`` (prefix columns first).
    """
    keys, values = adapter.prepend(k, v)
    keys = key_norm(keys) if key_norm is not None else keys
    if adapter.gated:
        p = adapter.num_tokens
        out, weights = attend(q, keys[..., p:, :], v, bias, dropout=dropout, scale=scale, need_weights=need_weights)
        extra, prefix_weights = attend(q, keys[..., :p, :], values[..., :p, :], None, dropout=dropout, scale=scale,
                                       need_weights=need_weights)
        if weights is not None and prefix_weights is not None:
            weights = torch.cat([prefix_weights * adapter.gate_value(q), weights], dim=-1)
        return out + adapter.gate_value(q) * extra, weights
    bias = pad_columns(bias.expand(*bias.shape[:-1], k.shape[-2]), adapter.num_tokens) if bias is not None else None
    return attend(q, keys, values, bias, dropout=dropout, scale=scale, need_weights=need_weights)


#: Attention whose definition leaves no place for a token prefix: (timm module, class).
_CHANNEL_ATTENTION = (("timm.models.edgenext", "CrossCovarianceAttn"), ("timm.models.xcit", "XCA"))


def prefix_undefined(module: nn.Module) -> str | None:
    """Why prefix tuning is not defined for ``module``'s attention, or ``None`` if nothing rules it out.

    Cross-covariance attention (XCA: EdgeNeXt, XCiT) attends over channels: ``softmax(q̂ k̂ᵀ · τ)`` is a ``d x d``
    map that sums over the tokens, so ``p`` more tokens in ``k`` and ``v`` leave ``q k'ᵀ`` undefined.
    """
    for module_name, class_name in _CHANNEL_ATTENTION:
        if type(module) is imported_class(module_name, class_name):
            return (f"{class_name} is cross-covariance attention (XCA), which attends over channels, not tokens: "
                    "there are no key/value positions along the sequence to prepend a prefix to")
    return None

r"""Per-sample adapters: each row of a batch through its own named LoRA adapter, in one batched pass.

::

    with per_sample_adapters(model, ["french", None, "code", "french"]):   # one name (or None) per batch row
        logits = model(ids)                                                # rows 0 and 3 with "french", ...

Each adapted layer keeps its base computation; only the update is computed per row. The layer's adapters (the
named ones the rows use) are stacked, ranks zero-padded to the largest, each scale folded into its B, plus a zero
slot for ``None`` rows::

    A: (K+1, R, in)    B: (K+1, out, R)    slot of row i: s_i    update_i = B[s_i] A[s_i] x_i   (two torch.bmm)

Embedding looks rows up in the stacked A by ``(slot, token id)``; a convolution folds the batch into channels (one
grouped convolution with ``groups = batch`` for A, one 1x1 for B; a grouped base convolves each row with its
slot's whole update ``ΔW``, one convolution with ``groups = batch · groups``, either grouped form). The stacks are
built from the adapters' own parameters on each call (parked adapters included, see :mod:`lightning_peft.named`),
so in training gradients reach each adapter from its own rows only; without gradients they are built once and
reused until a parameter changes. LoRA dropout applies per row with that row's adapter's probability (training only).

The layers in the model's tree carry the computation (the seam ``row_delta`` of
:class:`~lightning_peft.lora.layers.LoRALayer`): inside the context the first adapter named is the active one
(the previous one comes back on exit), and each of its LoRA layers computes every row's update.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapter import adapters
from lightning_peft.lora.attention import LoRAMultiheadAttention
from lightning_peft.lora.conv import LoRAConv
from lightning_peft.lora.layers import LoRAEmbedding, LoRALayer, LoRALinear
from lightning_peft.lora.sources import plain_lora_layers
from lightning_peft.named import active_adapter, adapter_parts, list_adapters, same_layers, set_adapter

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: Per carrier layer, the stacked factors built without gradients and the key they were built for (adapters, their
#: parameters' versions, device, dtype): serving calls with new names per batch reuse them.
_Stacks = tuple[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]
_STACKS: weakref.WeakKeyDictionary[nn.Module, _Stacks] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run each batch row through its own named LoRA adapter (``None``: the base model) while the context is open.

    Every model call inside the context takes a batch of ``len(names)`` rows (the first tensor argument's first
    dimension); row ``i`` computes exactly what it computes alone with ``set_adapter(model, names[i])``, in eval and
    in training, in one batched pass. Gradients reach each adapter from its own rows only, parked adapters
    included: build the optimizer over every adapter's parameters with :func:`adapter_parameters`::

        params = [p for name in list_adapters(model) for p in adapter_parameters(model, name)]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

    LoRA dropout applies to each row with its adapter's probability (in training). The first adapter named is the
    active one inside the context, and the adapter active before comes back on exit (also on an error).

    Args:
        model: A model with named LoRA adapters (:func:`~lightning_peft.add_adapter`; ``"default"`` for an unnamed
            one) on Linear, transformers ``Conv1D``, Embedding or Conv (grouped too) layers.
        names: One adapter name, or ``None`` for the base model, per batch row.

    Returns:
        The context yields ``model``.

    Raises:
        KeyError: A name is not an adapter of the model (the message lists them).
        TypeError: ``names`` is a string, not a sequence of names.
        ValueError: On entry: an adapter named holds another method (prefix, prompt), DoRA, trained base tensors
            (``trainable_modules``), a merged update, layers other than the four kinds (``nn.MultiheadAttention``,
            ``target_parameters``, a weight read by the parent), or the adapters adapt different
            layers. On a call, before anything is computed: a batch of another size than ``len(names)``.

    Example:
        >>> from lightning_peft import LoRAConfig, add_adapter, inject
        >>> model = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
        >>> model = add_adapter(model, "other", LoRAConfig(r=1, target_modules=["0"]))
        >>> with per_sample_adapters(model, ["default", None, "other"]):
        ...     model(torch.ones(3, 4)).shape
        torch.Size([3, 4])
    """
    rows = _checked_names(model, names)
    used = list(dict.fromkeys(name for name in rows if name is not None))
    layers = _same_layers(used, [_lora_layers(model, name) for name in used])
    previous = active_adapter(model)
    carrier = used[0] if used else None
    if previous is not None and previous not in used:
        _refuse_merged(model, previous)
    hook = model.register_forward_pre_hook(_batch_check(len(rows)), with_kwargs=True, prepend=True)
    switched = previous not in used and previous != carrier
    carriers: list[LoRALayer] = []
    try:
        if switched:
            set_adapter(model, carrier)
        in_tree = {name: module for name, module in adapters(model)}
        for layer, by_adapter in layers.items():
            module = cast(LoRALayer, in_tree[layer])  # the active adapter is one of ``used``: checked above
            slots = [by_adapter[name] for name in used]
            for slot in slots:  # parked adapters follow their base layer's device, as set_adapter does
                slot.to(module.base_weight.device)
            module.__dict__["row_delta"] = _RowDelta(module, slots, [None if n is None else used.index(n)
                                                                     for n in rows])
            carriers.append(module)
        yield model
    finally:
        for module in carriers:
            module.__dict__.pop("row_delta", None)
        hook.remove()
        if switched:
            set_adapter(model, previous)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of the named adapter ``name``, active or parked (not in ``model.parameters()``), each once.

    Parked adapters' tensors are the ones :func:`per_sample_adapters` computes with, so an optimizer over
    ``[p for n in list_adapters(model) for p in adapter_parameters(model, n)]`` trains every adapter.

    Raises:
        KeyError: No adapter has that name (the message lists the model's adapters).
    """
    found: dict[int, nn.Parameter] = {}
    for _, adapter in adapter_parts(model, name)[0]:
        for local, param in adapter.named_parameters():
            if not local.startswith("base_layer."):
                found.setdefault(id(param), param)
    return list(found.values())


# --- checks on entry ------------------------------------------------------------------------------------------
def _checked_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    if isinstance(names, str):
        raise TypeError(f"names must hold one adapter name (or None) per batch row, not a string; got {names!r}. "
                        f"Pass [{names!r}] * batch_size for one adapter on every row.")
    rows = list(names)
    existing = list_adapters(model)
    unknown = [n for n in rows if n is not None and n not in existing]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r}; the model has {existing} (None: the base model).")
    return rows


def _lora_layers(model: nn.Module, name: str) -> dict[str, LoRALayer]:
    """The LoRA layers of the named adapter ``name`` by layer name; raises where one cannot compute per row."""
    found, _ = plain_lora_layers(model, name, "per_sample_adapters")
    for layer, adapter in found.items():
        problem = _layer_problem(adapter)
        if problem is not None:
            raise ValueError(f"adapter {name!r} at {layer!r}: {problem}; per_sample_adapters computes LoRA on "
                             "Linear, Conv1D, Embedding and Conv layers only.")
        if adapter.merged:
            raise ValueError(f"adapter {name!r} is merged into the base weights ({layer!r}), which every row "
                             "shares; call unmerge(model) first.")
    return found


def _layer_problem(adapter: nn.Module) -> str | None:
    if isinstance(adapter, LoRAMultiheadAttention) or not isinstance(adapter, (LoRALinear, LoRAEmbedding, LoRAConv)):
        return f"{type(adapter).__name__} has no per-row form"
    if adapter.read_directly:
        return "its parent reads the layer's weight directly, so no call sees the rows"
    return None


def _same_layers(names: list[str], found: list[dict[str, LoRALayer]]) -> dict[str, dict[str, LoRALayer]]:
    """``{layer: {adapter name: LoRA layer}}``; raises where the adapters adapt different layers or differently."""
    if not found:
        return {}
    same_layers(names, found, "per_sample_adapters needs every adapter of a batch on the same layers")
    for name, layers in zip(names[1:], found[1:], strict=True):
        for layer, adapter in layers.items():
            if adapter.base_layer is not found[0][layer].base_layer:
                raise ValueError(f"adapters {names[0]!r} and {name!r} wrap different base layers at {layer!r}.")
    return {layer: {n: f[layer] for n, f in zip(names, found, strict=True)} for layer in found[0]}


def _refuse_merged(model: nn.Module, name: str) -> None:
    merged = [layer for layer, adapter in adapters(model) if adapter.merged]
    if merged:
        raise ValueError(f"the active adapter {name!r} is merged into the base weights ({merged[:3]}), which every "
                         "row shares; call unmerge(model) first.")


def _batch_check(size: int) -> Callable[..., None]:
    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = next((v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)), None)
        if first is None or first.dim() == 0 or first.shape[0] != size:
            seen = "no tensor argument" if first is None else f"a first tensor argument of shape {tuple(first.shape)}"
            raise ValueError(f"per_sample_adapters got {size} names, one per batch row, but the model was called with "
                             f"{seen}; pass one name (or None) per row of this batch.")
    return check


# --- the per-row update ---------------------------------------------------------------------------------------
class _RowDelta:
    """``x -> update`` of one layer for each row with its slot's adapter (already scaled), as ``row_delta``."""

    def __init__(self, carrier: LoRALayer, slots: list[LoRALayer], rows: list[int | None]) -> None:
        self.carrier, self.slots = carrier, slots
        self.rows = torch.tensor([len(slots) if s is None else s for s in rows], dtype=torch.long)
        self.rank = max([s.r for s in slots] + [1])
        self.p = torch.tensor([s.dropout.p if isinstance(s.dropout, nn.Dropout) else 0.0 for s in slots] + [0.0])
        #: A grouped convolution computes each row with its slot's whole ``ΔW`` (small for grouped and depthwise
        #: convs), which covers both grouped forms; others with the stacked factors.
        self._grouped = isinstance(carrier, LoRAConv) and carrier.base_layer.groups > 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = self.rows.numel()
        if x.dim() < 2 or x.shape[0] != n:
            raise ValueError(f"per_sample_adapters: {type(self.carrier.base_layer).__name__} got an input of shape "
                             f"{tuple(x.shape)}, whose first dimension is not the {n} batch rows (the model reshapes "
                             "its batch before this layer); such a layer cannot tell its rows apart.")
        a, b = self._factors(x.device)  # (n, R, in), (n, out, R): each row's slot, scale in B
        if isinstance(self.carrier, LoRAEmbedding):
            return self._embedding(x, a, b)
        x = self._dropped(x.to(a.dtype))
        if isinstance(self.carrier, LoRAConv):
            return self._conv(x, a, b)
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))  # (n, tokens, R)
        return torch.bmm(h, b.transpose(1, 2)).reshape(*x.shape[:-1], b.shape[1])  # (n, ..., out)

    def _factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``A`` and scaled ``B`` (the embedding: the whole table, and B per row)."""
        a, b = self._stacks(device)
        rows = self.rows.to(device)
        if isinstance(self.carrier, LoRAEmbedding):  # the lookup table, (slot, token) -> R, indexed by the ids
            return a.transpose(1, 2).reshape(-1, self.rank), b.index_select(0, rows)
        return a.index_select(0, rows), b.index_select(0, rows)

    def _stacks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` ``(K+1, R, in)`` and scaled ``B`` ``(K+1, out, R)`` from the adapters' own parameters; without
        gradients kept (per layer, across contexts) until a parameter changes."""
        params: list[torch.Tensor] = [t for s in self.slots for t in (s.lora_A, s.lora_B)]
        dtype = self.carrier.lora_A.dtype
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._stack(device, dtype)
        # the entry holds ``params`` too, so their ids cannot be reused by other tensors while it lives
        key: tuple[Any, ...] = (device, dtype, *((id(p), p._version) for p in params))
        cached = _STACKS.get(self.carrier)
        if cached is None or cached[0] != key:
            _STACKS[self.carrier] = (key, self._stack(device, dtype), params)
        return _STACKS[self.carrier][1]

    def _stack(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grouped:  # each slot's whole update (base layout, either grouped form); no B
            updates = [s.delta_weight().to(device, dtype) for s in self.slots]
            return torch.stack([*updates, torch.zeros_like(updates[0])]), updates[0].new_zeros(len(updates) + 1, 0)
        rank = self.rank
        a_list, b_list = [], []
        for s in self.slots:  # ranks padded with zeros to the largest; the scale folded into B
            a_list.append(F.pad(s.lora_A.reshape(s.r, -1).to(device, dtype), (0, 0, 0, rank - s.r)))
            b_list.append(F.pad((s.lora_B.reshape(-1, s.r) * s.scale).to(device, dtype), (0, rank - s.r)))
        a_list.append(a_list[0].new_zeros(rank, a_list[0].shape[1]))  # the base model's slot
        b_list.append(b_list[0].new_zeros(b_list[0].shape[0], rank))
        return torch.stack(a_list), torch.stack(b_list)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with each row's adapter's probability (training only)."""
        if not self.carrier.training or not bool((self.p > 0).any()):
            return x
        p = self.p.to(x.device, x.dtype)[self.rows.to(x.device)].reshape(-1, *[1] * (x.dim() - 1))  # (n, 1, ...)
        keep = torch.rand_like(x) >= p
        return x * keep / (1.0 - p)

    def _embedding(self, x: torch.Tensor, table: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        emb = self.carrier.base_layer
        assert isinstance(emb, nn.Embedding)
        n, vocab = x.shape[0], emb.num_embeddings
        index = x + self.rows.to(x.device).reshape(-1, *[1] * (x.dim() - 1)) * vocab  # (n, ...) into the table
        h = F.embedding(index, table, scale_grad_by_freq=emb.scale_grad_by_freq)  # (n, ..., R)
        if emb.padding_idx is not None:  # as F.embedding(padding_idx=...): the value, but no gradient
            h = torch.where((x == emb.padding_idx).unsqueeze(-1), h.detach(), h)
        return torch.bmm(h.reshape(n, -1, h.shape[-1]), b.transpose(1, 2)).reshape(*x.shape, b.shape[1])

    def _conv(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        base = self.carrier.base_layer
        assert isinstance(base, nn.modules.conv._ConvNd)
        n, dims = x.shape[0], x.dim() - 2
        if x.dim() != base.weight.dim():
            raise ValueError(f"per_sample_adapters: {type(base).__name__} got an unbatched input of shape "
                             f"{tuple(x.shape)}; the rows are the first dimension of a batched input.")
        padding: Any = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        folded = x.reshape(1, -1, *x.shape[2:])  # (1, n·in, *spatial): the batch folded into channels
        if self._grouped:  # a: each row's ΔW (n, out, in/g, *k), one grouped conv over rows and groups
            y = _CONV[dims](folded, a.flatten(0, 1), None, base.stride, padding, base.dilation, groups=n * base.groups)
            return y.reshape(n, -1, *y.shape[2:])
        a_weight = a.reshape(n * self.rank, base.in_channels, *base.kernel_size)
        h = _CONV[dims](folded, a_weight, None, base.stride, padding, base.dilation, groups=n)  # (1, n·R, *out)
        y = _CONV[dims](h, b.reshape(-1, self.rank, *[1] * dims), groups=n)  # (1, n·out, *out)
        return y.reshape(n, -1, *y.shape[2:])

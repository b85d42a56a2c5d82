r"""Hugging Face PEFT's adapter directory, written from our adapters so ``peft.PeftModel.from_pretrained`` loads it
and computes what they compute (:mod:`~lightning_peft.adapter_files.peft_load` reads it back).

A PEFT directory holds ``adapter_config.json`` (with a ``peft_type``) and ``adapter_model.safetensors`` whose keys
start with ``base_model.model.`` and follow PEFT's layer layout. The mapping, per method::

    ours                                   PEFT (after "base_model.model.")
    LoRA     x.lora_A / x.lora_B              x.lora_A.weight / x.lora_B.weight          (Linear, Conv1D, Conv)
             x.lora_A / x.lora_B              x.lora_embedding_A / x.lora_embedding_B    (Embedding)
             x.lora_out_A / x.lora_out_B      x.base_layer.out_proj.lora_A.weight / ...  (MultiheadAttention, read only)
             x.lora_magnitude (DoRA, (out,))  x.lora_magnitude_vector ((1, out, 1...) for Conv), use_dora
             trainable_modules (whole)        modules_to_save
    prompt   emb.prompt (p, d)                prompt_embeddings (p, d)
    prefix   per layer l: prefix_keys,        prompt_embeddings (p, L·2·h·d):
             prefix_values (h, p, d)          [t, l, 0|1, head, :] = keys|values[head, t, :]

Per-layer ranks and scales become explicit ``rank_pattern``/``alpha_pattern`` entries keyed by the full module
name (anchored with ``^`` so no other module's suffix matches), so every layer keeps its exact scale.

What PEFT cannot express is refused with a :class:`ValueError` naming the layer and the reason, instead of a file
that would load wrong: LoRA on grouped, dilated or non-zero-padded convolutions, PiSSA-initialised layers (the
base weights were changed), ``nn.MultiheadAttention`` (PEFT 0.21 adds its out_proj update twice), biases trained
without their module, layer types only we know; prefix gates and prefixes PEFT's one-embedding layout cannot hold;
patch and pixel prompts; more than one method per file.
A reparameterized prefix is written as the prefix its MLP produces now (PEFT saves its MLP's output too).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_peft.adapter import Adapter, adapters
from lightning_peft.adapter_files.constants import PEFT_PREFIX, PEFT_TENSOR_METADATA, PEFT_VERSION
from lightning_peft.adapter_files.disk import write_adapter_files
from lightning_peft.adapter_files.peft_keys import (
    experts_to_peft,
    is_conv1d,
    magnitude_to_peft,
    peft_lora_keys,
    peft_parameter_keys,
)
from lightning_peft.lora import LoRAConfig, LoRALayer, LoRAParameters
from lightning_peft.lora.dora import DoRALayer
from lightning_peft.methods import Method
from lightning_peft.prefix.attention.base import PrefixAttention
from lightning_peft.prompt.tokens import TokenPrompt
from lightning_peft.record import find_record
from lightning_peft.targets import is_inside
from lightning_peft.tensors import adapter_tensors, marked
from lightning_peft.zero3 import gathered, is_nonzero_rank


def save_peft(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of ``model`` as a PEFT directory that ``peft.PeftModel.from_pretrained(base, path)`` loads.

    ``model`` is the injected model whose base PEFT will wrap (the transformers model itself, not a
    LightningModule holding it).

    Raises:
        ValueError: The adapter uses something PEFT has no equivalent for; the message names it and why.
    """
    found = list(adapters(model))
    if not found:
        raise ValueError(f"{type(model).__name__} holds no adapter to save; inject a method first.")
    kinds = {_kind(adapter) for _, adapter in found}
    if len(kinds) > 1:
        raise ValueError(
            f"PEFT stores one method per adapter directory; this model combines {', '.join(sorted(kinds))}. "
            "Save it in the native format (format='native'), or save a model with one method."
        )
    kind = kinds.pop()
    converters = {"lora": _lora_to_peft, "prompt": _prompt_to_peft, "prefix": _prefix_to_peft}
    if kind not in converters:
        name, adapter = found[0]
        raise ValueError(
            f"{type(adapter).__name__} at {name!r} has no Hugging Face PEFT equivalent (PEFT has LoRA, token prompts "
            "and prefix tuning for transformers models only). Save it with format='native'."
        )
    if kind != "lora" and _marked_modules(model):
        raise ValueError(
            f"trainable_modules with {kind} tuning: this exporter writes modules_to_save for LoRA only. "
            "Save with format='native'."
        )
    # under DeepSpeed ZeRO-3 every rank gathers (a collective), and rank 0 writes
    with gathered([tensor for _, tensor in adapter_tensors(model)]):
        config, tensors = converters[kind](model, found)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    directory = Path(path)
    if is_nonzero_rank():  # rank 0 writes (see save_native)
        return directory
    base = {"peft_version": PEFT_VERSION, "base_model_name_or_path": _name_or_path(model), "revision": None,
            "inference_mode": True, "auto_mapping": None}
    return write_adapter_files(directory, tensors, {**base, **config}, PEFT_TENSOR_METADATA, sort_keys=True)


_METHODS: tuple[tuple[type[Adapter], str], ...] = ((LoRALayer, "lora"), (LoRAParameters, "lora"),
                                                   (TokenPrompt, "prompt"), (PrefixAttention, "prefix"))


def _kind(adapter: Adapter) -> str:
    for cls, name in _METHODS:
        if isinstance(adapter, cls):
            return name
    return type(adapter).__name__


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(getattr(model, "config", None), "_name_or_path", None)
    return value or None


def _lora_to_peft(model: nn.Module, found: list[tuple[str, Adapter]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    methods = [m for m in _methods_of(found) if isinstance(m, LoRAConfig)]
    rslora = bool(methods) and all(m.rslora for m in methods)
    dropouts = {float(m.dropout) for m in methods} or {0.0}
    if len(dropouts) > 1:
        raise ValueError(f"PEFT has one lora_dropout per adapter; these LoRA methods use {sorted(dropouts)}.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = []
    parameters: dict[str, LoRAParameters] = {}
    dora = {isinstance(adapter, DoRALayer) for _, adapter in found}
    if len(dora) > 1:
        raise ValueError("PEFT has one use_dora per adapter file; this model mixes DoRA and plain LoRA layers. Save "
                         "with format='native', or use one kind for every layer.")
    for name, adapter in found:
        if isinstance(adapter, LoRAParameters):
            parameters[name] = adapter
            continue
        layer = cast(LoRALayer, adapter)  # save_peft sends LoRA layers only
        for ours, theirs in peft_lora_keys(name, layer).items():
            tensor = getattr(layer, ours)
            tensors[PEFT_PREFIX + theirs] = magnitude_to_peft(layer, tensor) if ours == "lora_magnitude" else tensor
        ranks[name] = layer.r
        alphas[name] = layer.scale * (layer.r ** 0.5 if rslora else layer.r)
        conv1d.append(is_conv1d(layer))
    modules_to_save = _modules_to_save(model)
    for name in modules_to_save:
        module = model.get_submodule(name)
        for local, tensor in module.state_dict(keep_vars=True).items():
            tensors[f"{PEFT_PREFIX}{name}.{local}"] = tensor
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else next(iter(parameters.values())).r
    alpha = (Counter(alphas.values()).most_common(1)[0][0] if ranks
             else _alpha(next(iter(parameters.values())), rslora))
    tensors.update(_parameters_to_peft(parameters, r, alpha, rslora, any(conv1d)))
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "lora_dropout": dropouts.pop(), "bias": "none", "fan_in_fan_out": bool(conv1d) and all(conv1d),
        "target_modules": "|".join(f"(?:{re.escape(n)})" for n in ranks) if ranks else [],
        "target_parameters": [f"{n}.{p}" for n, adapter in parameters.items() for p in adapter.lora_A] or None,
        "rank_pattern": {_anchored(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_anchored(n): v for n, v in alphas.items() if v != alpha},
        "modules_to_save": modules_to_save or None, "init_lora_weights": True, "use_dora": dora == {True},
        "lora_bias": False, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    }
    return config, tensors


def _alpha(layer: LoRALayer | LoRAParameters, rslora: bool) -> float:
    return layer.scale * (layer.r ** 0.5 if rslora else layer.r)


def _parameters_to_peft(parameters: dict[str, LoRAParameters], r: int, alpha: float, rslora: bool, conv1d: bool
                        ) -> dict[str, torch.Tensor]:
    """PEFT's tensors for ``target_parameters`` adapters, which PEFT gives the file's one ``r`` and ``lora_alpha``."""
    tensors = {}
    for name, adapter in parameters.items():
        if adapter.r != r or _alpha(adapter, rslora) != alpha or conv1d:
            raise ValueError(
                f"target_parameters of {name!r} use r={adapter.r}, alpha={_alpha(adapter, rslora):g} (or sit beside "
                f"transformers Conv1D layers); PEFT applies the file's r={r}, lora_alpha={alpha:g} and "
                "fan_in_fan_out=False to every parameter target. Give them the same rank and alpha, or save with "
                "format='native'."
            )
        order = [p for p in adapter.base_layer._parameters if p in adapter.lora_A]  # the module's own order
        for ours, theirs in peft_parameter_keys(name, order).items():
            factor, _, parameter = ours.partition(".")
            source = adapter.lora_A if factor == "lora_A" else adapter.lora_B
            tensors[PEFT_PREFIX + theirs] = experts_to_peft(factor[-1], source[parameter])
    return tensors


def _methods_of(found: list[tuple[str, Adapter]]) -> list[Method]:
    """The methods that made ``found``, each once, from the adapters' own records (a sub-module has no root's)."""
    origins = [record.origin for _, adapter in found if (record := find_record(adapter)) and record.origin]
    return list({id(origin.method): origin.method for origin in origins}.values())


def _anchored(name: str) -> str:
    # PEFT matches pattern keys as re.match(rf"(.*\.)?({key})$", module_name); "^" keeps the prefix group empty.
    return "^" + re.escape(name)


def _marked_modules(model: nn.Module) -> dict[str, frozenset[str]]:
    return {n: marked(m) for n, m in model.named_modules() if marked(m)}


def _modules_to_save(model: nn.Module) -> list[str]:
    """Modules trained whole (``trainable_modules``) as PEFT ``modules_to_save``; raises for partial ones."""
    names = []
    all_names = [n for n, _ in model.named_modules()]
    for name, chosen in _marked_modules(model).items():
        module = model.get_submodule(name)
        local = {n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                 if n not in module._non_persistent_buffers_set}
        if set(chosen) != local or ".base_layer" in f".{name}" or name.endswith("base_layer"):
            raise ValueError(
                f"{name!r} trains/saves {sorted(chosen)} of its tensors {sorted(local)} (a bias option or BatchNorm "
                "statistics); PEFT's modules_to_save keeps whole modules that no adapter wraps. Use bias='none' and "
                "batchnorm='frozen', or save with format='native'."
            )
        names.append(name)
    top = [n for n in names if not is_inside(n, (o for o in names if o != n))]  # a trained head's children too
    for name in top:
        clashes = [n for n in all_names if n != name and n.endswith(name)]
        if clashes:
            raise ValueError(
                f"PEFT selects modules_to_save by name suffix, and {name!r} is also a suffix of {clashes[:3]}; "
                "the file would train those too. Give the module a distinct name, or save with format='native'."
            )
    return top


def _transformers_host(model: nn.Module, what: str) -> nn.Module:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise ValueError(
            f"PEFT's {what} needs a transformers model (PEFT reads its config); {type(model).__name__} is not one. "
            "Pass the transformers model itself, or save with format='native'."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{what} on an encoder-decoder ({type(model).__name__}) is stored by PEFT for encoder and decoder "
            "together, a layout this exporter does not write. Save with format='native'."
        )
    return model


def _task_type(model: nn.Module) -> str:
    can_generate = getattr(model, "can_generate", None)
    return "CAUSAL_LM" if callable(can_generate) and can_generate() else "FEATURE_EXTRACTION"


def _prompt_to_peft(
    model: nn.Module, found: list[tuple[str, Adapter]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    host = _transformers_host(model, "prompt tuning")
    name, adapter = found[0]
    if len(found) > 1 or getattr(adapter, "prepend_output", False):
        raise ValueError(f"PEFT's prompt tuning has one prompt at a transformers model's input; got {len(found)} at "
                         f"{[n for n, _ in found]}. Save with format='native'.")
    prompt = adapter.prompt
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": _task_type(host), "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": getattr(host.config, "num_attention_heads", None),
        "num_layers": getattr(host.config, "num_hidden_layers", None), "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        "modules_to_save": None,
    }
    return config, {"prompt_embeddings": prompt}


def _prefix_to_peft(
    model: nn.Module, found: list[tuple[str, Adapter]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    host = _transformers_host(model, "prefix tuning")
    layers = getattr(host.config, "num_hidden_layers", None)
    shapes = {a.shape for _, a in found}
    gated = [n for n, a in found if a.gated]
    if gated:
        raise ValueError(f"the prefix gate (exact start) of {gated[:3]} has no PEFT equivalent: PEFT's prefix always "
                         "shares the softmax with the tokens. Train with gate=False, or save with format='native'.")
    shape = shapes.pop()
    if shapes or shape.key_dim != shape.value_dim or len(found) != layers:
        raise ValueError(
            f"PEFT stores a prefix for each of the model's {layers} layers with one key/value width; this model has "
            f"{len(found)} prefixed layers with shapes {sorted({str(a.shape) for _, a in found})}. Prefix every "
            "layer (no layers/target_modules filter), or save with format='native'."
        )
    with torch.no_grad():  # a reparameterized prefix: what its MLP produces now
        pairs = [torch.stack(a._prefix_tensors()) for _, a in found]  # each (2, h, p, d)
    stacked = torch.stack(pairs)  # (L, 2, h, p, d)
    p = stacked.shape[3]
    embedding = stacked.permute(3, 0, 1, 2, 4).reshape(p, -1)  # (p, L·2·h·d)
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": _task_type(host), "num_virtual_tokens": p,
        "token_dim": shape.kv_heads * shape.key_dim, "num_attention_heads": shape.kv_heads, "num_layers": layers,
        "num_transformer_submodules": 1, "encoder_hidden_size": shape.kv_heads * shape.key_dim,
        "prefix_projection": False, "modules_to_save": None,
    }
    return config, {"prompt_embeddings": embedding}

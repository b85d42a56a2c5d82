r"""Hugging Face PEFT's adapter directory, both ways: write ours so ``peft.PeftModel.from_pretrained`` loads it, and
read PEFT's into our adapters, with identical outputs.

A PEFT directory holds ``adapter_config.json`` (with a ``peft_type``) and ``adapter_model.safetensors`` whose keys
start with ``base_model.model.`` and follow PEFT's layer layout. The mapping, per method::

    ours                                   PEFT (after "base_model.model.")
    LoRA     x.lora_A / x.lora_B              x.lora_A.weight / x.lora_B.weight          (Linear, Conv1D, Conv)
             x.lora_A / x.lora_B              x.lora_embedding_A / x.lora_embedding_B    (Embedding)
             x.lora_out_A / x.lora_out_B      x.base_layer.out_proj.lora_A.weight / ...  (MultiheadAttention, read only)
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
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import Adapter, adapters, is_injected
from lightning_peft.errors import AdapterStateError, PEFTWarning
from lightning_peft.files import CONFIG_NAME, read_config, read_tensors, write_adapter_files
from lightning_peft.injection import applied_methods, inject
from lightning_peft.targets import is_inside
from lightning_peft.tensors import adapter_tensors, marked
from lightning_peft.zero3 import gathered, is_nonzero_rank

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release these files were checked against


def is_peft_directory(path: str | Path) -> bool:
    """Whether ``path`` holds an adapter saved in Hugging Face PEFT's format (its config names a ``peft_type``)."""
    return (Path(path) / CONFIG_NAME).is_file() and "peft_type" in read_config(Path(path))


# --- saving -------------------------------------------------------------------------------------------------------
def save_peft(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of ``model`` as a PEFT directory that ``peft.PeftModel.from_pretrained(base, path)`` loads.

    ``model`` is the injected model whose base PEFT will wrap (the transformers model itself, not a
    LightningModule holding it).

    Raises:
        ValueError: The adapter uses something PEFT has no equivalent for; the message names it and why.
    """
    from lightning_peft.lora import LoRALayer
    from lightning_peft.prefix.attention.base import PrefixAttention
    from lightning_peft.prompt.tokens import TokenPrompt

    found = list(adapters(model))
    if not found:
        raise ValueError(f"{type(model).__name__} holds no adapter to save; inject a method first.")
    kinds = {_kind(adapter, LoRALayer, TokenPrompt, PrefixAttention) for _, adapter in found}
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
    with gathered([tensor for _, tensor in adapter_tensors(model)]) as partitioned:
        config, tensors = converters[kind](model, found)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    directory = Path(path)
    if partitioned and is_nonzero_rank():
        return directory
    base = {"peft_version": PEFT_VERSION, "base_model_name_or_path": _name_or_path(model), "revision": None,
            "inference_mode": True, "auto_mapping": None}
    return write_adapter_files(directory, tensors, {**base, **config}, {"format": "pt"}, sort_keys=True)


def _kind(adapter: Adapter, lora: type, token: type, prefix: type) -> str:
    for cls, name in ((lora, "lora"), (token, "prompt"), (prefix, "prefix")):
        if isinstance(adapter, cls):
            return name
    return type(adapter).__name__


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(getattr(model, "config", None), "_name_or_path", None)
    return value or None


def _lora_to_peft(model: nn.Module, found: list[tuple[str, Adapter]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from lightning_peft.lora import LoRAConfig

    methods = [m for m in applied_methods(model) if isinstance(m, LoRAConfig)]
    rslora = bool(methods) and all(m.rslora for m in methods)
    dropouts = {float(getattr(m, "dropout", 0.0)) for m in methods} or {0.0}
    if len(dropouts) > 1:
        raise ValueError(f"PEFT has one lora_dropout per adapter; these LoRA methods use {sorted(dropouts)}.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = []
    for name, layer in found:
        keys = _peft_lora_keys(name, layer)
        for ours, theirs in keys.items():
            tensors[PREFIX + theirs] = getattr(layer, ours)
        ranks[name] = layer.r
        alphas[name] = layer.scale * (layer.r ** 0.5 if rslora else layer.r)
        conv1d.append(type(layer).__name__ == "LoRAConv1D")
    modules_to_save = _modules_to_save(model)
    for name in modules_to_save:
        module = model.get_submodule(name)
        for local, tensor in module.state_dict(keep_vars=True).items():
            tensors[f"{PREFIX}{name}.{local}"] = tensor
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "lora_dropout": dropouts.pop(), "bias": "none", "fan_in_fan_out": all(conv1d),
        "target_modules": "|".join(f"(?:{re.escape(n)})" for n in ranks),
        "rank_pattern": {_anchored(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {_anchored(n): v for n, v in alphas.items() if v != alpha},
        "modules_to_save": modules_to_save or None, "init_lora_weights": True, "use_dora": False,
        "lora_bias": False, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    }
    return config, tensors


def _anchored(name: str) -> str:
    # PEFT matches pattern keys as re.match(rf"(.*\.)?({key})$", module_name); "^" keeps the prefix group empty.
    return "^" + re.escape(name)


def _peft_lora_keys(name: str, layer: Adapter) -> dict[str, str]:
    """Our tensor names on ``layer`` → PEFT's keys (without ``base_model.model.``); raises where PEFT differs."""
    kind = type(layer).__name__
    if getattr(layer, "pissa_applied", False):
        raise ValueError(
            f"LoRA layer {name!r} was initialised with PiSSA, which changed the base weights; PEFT would load it "
            "onto the original weights and compute something else. Save with format='native', or merge_and_unload()."
        )
    if kind in ("LoRALinear", "LoRAConv1D"):
        return {"lora_A": f"{name}.lora_A.weight", "lora_B": f"{name}.lora_B.weight"}
    if kind == "LoRAConv":
        base = layer.base_layer
        problems = []
        if base.groups != 1 and layer.shared_over_groups:
            problems.append(f"groups={base.groups} with conv_groups='shared' (one B A shared by all groups; PEFT's "
                            "grouped-conv LoRA is an ungrouped A over all input channels and a grouped 1x1 B)")
        elif base.groups != 1:
            problems.append(f"groups={base.groups} (our per-group A is a grouped conv, PEFT's an ungrouped one over "
                            "all input channels, and PEFT cannot merge grouped convs)")
        if any(d != 1 for d in base.dilation):
            problems.append(f"dilation={base.dilation} (PEFT's A conv drops dilation)")
        if base.padding_mode != "zeros":
            problems.append(f"padding_mode={base.padding_mode!r} (PEFT's A conv pads with zeros)")
        if problems:
            raise ValueError(
                f"LoRA on {name!r} has no PEFT equivalent: {'; '.join(problems)}. Leave the layer out "
                "(exclude_modules) before training for PEFT, or save with format='native'."
            )
        return {"lora_A": f"{name}.lora_A.weight", "lora_B": f"{name}.lora_B.weight"}
    if kind == "LoRAEmbedding":
        return {"lora_A": f"{name}.lora_embedding_A", "lora_B": f"{name}.lora_embedding_B"}
    if kind == "LoRAMultiheadAttention":
        raise ValueError(_MHA_BUG.format(name=name) + " Save with format='native', or leave the layer out.")
    raise ValueError(f"LoRA layer {name!r} is a {kind}, a layer type PEFT does not know; save with format='native'.")


_MHA_BUG = (
    "LoRA on nn.MultiheadAttention {name!r}: PEFT 0.21 adds the out_proj update twice (its merge-for-forward adds "
    "the delta and then merges the out_proj LoRA again), so PEFT would compute something else from the same file."
)


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


# --- loading ------------------------------------------------------------------------------------------------------
def load_peft(model: nn.Module, path: str | Path) -> nn.Module:
    """Read an adapter saved by Hugging Face PEFT into ``model``, injecting the equivalent method if it has none.

    Supported: LoRA (Linear, Conv1D, Conv, Embedding, MultiheadAttention; rsLoRA, ``rank_pattern``,
    ``alpha_pattern``, ``modules_to_save`` → ``trainable_modules``), prompt tuning and prefix tuning.

    Raises:
        ValueError: The file uses a PEFT method or option we have no equivalent for.
        AdapterStateError: The file's tensors do not fit the model's adapters.
    """
    directory = Path(path)
    config = read_config(directory)
    state = {k.removeprefix(PREFIX): v for k, v in read_tensors(directory).items()}
    peft_type = config.get("peft_type")
    unknown = sorted(set(config) - _PEFT_FIELDS.get(str(peft_type), set(config)))
    if unknown:
        raise ValueError(
            f"{directory / CONFIG_NAME} has fields PEFT {PEFT_VERSION}'s {peft_type} config does not know ({unknown}): "
            "it was written by a newer PEFT or edited, and ignoring them could load a different adapter. Remove them "
            f"if you know they change nothing, or save it with PEFT {PEFT_VERSION}."
        )
    if peft_type == "LORA":
        return _load_lora(model, config, state)
    if peft_type == "PROMPT_TUNING":
        return _load_prompt(model, config, state)
    if peft_type == "PREFIX_TUNING":
        return _load_prefix(model, config, state)
    raise ValueError(f"{directory} holds a PEFT {peft_type} adapter; lightning_peft reads LORA, PROMPT_TUNING and "
                     "PREFIX_TUNING.")


_COMMON_FIELDS = {"auto_mapping", "base_model_name_or_path", "inference_mode", "modules_to_save", "peft_type",
                  "peft_version", "revision", "task_type"}
_PROMPT_COMMON = _COMMON_FIELDS | {"num_attention_heads", "num_layers", "num_transformer_submodules",
                                   "num_virtual_tokens", "token_dim"}
_PEFT_FIELDS = {  # the fields of PEFT 0.21's configs (dataclasses.fields of LoraConfig, ...)
    "LORA": _COMMON_FIELDS | {
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "bias", "corda_config", "ensure_weight_tying",
        "eva_config", "exclude_modules", "fan_in_fan_out", "init_lora_weights", "kasa_config", "layer_replication",
        "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
        "lora_ga_config", "megatron_config", "megatron_core", "monteclora_config", "qalora_group_size", "r",
        "rank_pattern", "runtime_config", "target_modules", "target_parameters", "trainable_token_indices",
        "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config"},
    "PROMPT_TUNING": _PROMPT_COMMON | {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_kwargs",
                                      "tokenizer_name_or_path"},
    "PREFIX_TUNING": _PROMPT_COMMON | {"encoder_hidden_size", "init_weights", "prefix_projection"},
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))$")


def _exact(name: str) -> str:
    """A target rule that selects exactly ``name`` (a group: never equal to, nor a dotted suffix of, a name)."""
    return f"(?:{re.escape(name)})"


def _load_lora(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    from lightning_peft.lora import LoRAConfig

    unsupported = {k: config.get(k) for k in ("use_dora", "lora_bias", "trainable_token_indices", "target_parameters",
                                               "layer_replication", "alora_invocation_tokens", "use_qalora",
                                               "use_bdlora", "arrow_config", "megatron_config") if config.get(k)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ValueError(f"this PEFT LoRA uses {unsupported}, which lightning_peft's LoRA does not implement.")
    ours: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            ours[key] = tensor  # modules_to_save tensors keep their names
            continue
        module, ab = match["module"], match["ab"] or match["eab"]
        if module.endswith(".base_layer.out_proj"):  # nn.MultiheadAttention's out_proj update
            warnings.warn(_MHA_BUG.format(name=module.removesuffix(".base_layer.out_proj")) + " We load the update "
                          "once, as the LoRA formula says.", PEFTWarning, stacklevel=3)
            ours[f"{module.removesuffix('.base_layer.out_proj')}.lora_out_{ab}"] = tensor
            continue
        ours[f"{module}.lora_{ab}"] = tensor
        if ab == "A":
            ranks[module] = tensor.shape[0]
    if not is_injected(model):
        alphas = {n: _peft_pattern(config.get("alpha_pattern") or {}, n, config["lora_alpha"]) for n in ranks}
        names = [n for n, _ in model.named_modules()]
        saved = [n for n in names if any(n.endswith(k) for k in config.get("modules_to_save") or [])]
        inject(model, LoRAConfig(
            r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
            target_modules="|".join(_exact(n) for n in ranks), rslora=bool(config.get("use_rslora")),
            rank_pattern={_exact(n): r for n, r in ranks.items() if r != config["r"]},
            alpha_pattern={_exact(n): float(a) for n, a in alphas.items() if a != config["lora_alpha"]},
            trainable_modules=[_exact(n) for n in saved] or None,
        ))
    return _copy_in(model, ours)


def _peft_pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` wins."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _copy_in(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    from lightning_peft.state import load_adapter_state_dict

    return load_adapter_state_dict(model, state)


def _load_prompt(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    from lightning_peft.prompt import PromptTuningConfig, TokenPrompt

    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError("this PEFT prompt was made for an encoder-decoder (num_transformer_submodules=2), a layout "
                         "lightning_peft does not read; its token prompts on encoder-decoders prompt the encoder only.")
    p = int(config["num_virtual_tokens"])
    if not any(isinstance(a, TokenPrompt) for _, a in adapters(model)):
        inject(model, PromptTuningConfig(num_tokens=p, kind="tokens"))
    prompts = [(n, a) for n, a in adapters(model) if isinstance(a, TokenPrompt)]
    return _copy_in(model, {f"{prompts[0][0]}.prompt": state["prompt_embeddings"][:p]})


def _load_prefix(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    from lightning_peft.prefix import PrefixTuningConfig
    from lightning_peft.prefix.attention.base import PrefixAttention

    p = int(config["num_virtual_tokens"])
    if not any(isinstance(a, PrefixAttention) for _, a in adapters(model)):
        inject(model, PrefixTuningConfig(num_tokens=p))
    found = [(n, a) for n, a in adapters(model) if isinstance(a, PrefixAttention)]
    heads, d = found[0][1].shape.kv_heads, found[0][1].shape.key_dim
    embedding = state["prompt_embeddings"][:p]
    expected = p * len(found) * 2 * heads * d
    if embedding.numel() != expected:
        raise AdapterStateError(
            f"the PEFT prefix has shape {list(embedding.shape)}; this model's {len(found)} prefixed layers with "
            f"{heads} key/value heads of width {d} need ({p}, {expected // p}). Load it into the model it was made for."
        )
    layers = embedding.reshape(p, len(found), 2, heads, d).permute(1, 2, 3, 0, 4)  # (L, 2, h, p, d)
    ours = {}
    for (name, _), pair in zip(found, layers, strict=True):  # layers has len(found) rows by construction
        ours[f"{name}.prefix_keys"], ours[f"{name}.prefix_values"] = pair[0], pair[1]
    return _copy_in(model, ours)

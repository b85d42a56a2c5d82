"""Hugging Face PEFT's adapter directory, read into our adapters: the equivalent method is injected when the model
has none, and the outputs are identical to PEFT's (see :mod:`~lightning_peft.adapter_files.peft_save` for the
mapping of names and what each side can express).

Only PEFT's fields we know are accepted (those of PEFT 0.21's configs): a field from a newer PEFT could change
what the adapter computes, so it is refused rather than ignored.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.adapter import adapters, innermost, is_injected
from lightning_peft.adapter_files.constants import CONFIG_NAME, PEFT_PREFIX, PEFT_VERSION
from lightning_peft.adapter_files.disk import read_config, read_tensors
from lightning_peft.adapter_files.peft_keys import LORA_KEY, MHA_BUG, experts_from_peft, peft_parameter_keys
from lightning_peft.errors import AdapterStateError, PEFTWarning
from lightning_peft.injection import inject
from lightning_peft.lora import LoRAConfig, LoRAParameters
from lightning_peft.prefix import PrefixTuningConfig
from lightning_peft.prefix.attention.base import PrefixAttention
from lightning_peft.prompt import PromptTuningConfig, TokenPrompt
from lightning_peft.state import load_adapter_state_dict
from lightning_peft.targets import select_parameters


def is_peft_directory(path: str | Path) -> bool:
    """Whether ``path`` holds an adapter saved in Hugging Face PEFT's format (its config names a ``peft_type``)."""
    return (Path(path) / CONFIG_NAME).is_file() and "peft_type" in read_config(Path(path))


def load_peft(model: nn.Module, path: str | Path) -> nn.Module:
    """Read an adapter saved by Hugging Face PEFT into ``model``, injecting the equivalent method if it has none.

    Supported: LoRA (Linear, Conv1D, Conv, Embedding, MultiheadAttention; rsLoRA, ``rank_pattern``,
    ``alpha_pattern``, ``modules_to_save`` → ``trainable_modules``, DoRA's ``use_dora``), prompt tuning and prefix
    tuning.

    Raises:
        ValueError: The file uses a PEFT method or option we have no equivalent for.
        AdapterStateError: The file's tensors do not fit the model's adapters.
    """
    directory = Path(path)
    config = read_config(directory)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in read_tensors(directory).items()}
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


def _exact(name: str) -> str:
    """A target rule that selects exactly ``name`` (a group: never equal to, nor a dotted suffix of, a name)."""
    return f"(?:{re.escape(name)})"


def _load_lora(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    unsupported = {k: config.get(k) for k in ("lora_bias", "trainable_token_indices", "layer_replication",
                                               "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
                                               "megatron_config") if config.get(k)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ValueError(f"this PEFT LoRA uses {unsupported}, which lightning_peft's LoRA does not implement.")
    targets = list(config.get("target_parameters") or [])
    state = dict(state)
    ours = _parameters_from_peft(model, targets, state)  # takes their tensors out of state
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        match = LORA_KEY.match(key)
        if match is None:
            ours[key] = tensor  # modules_to_save tensors keep their names
            continue
        module, ab = match["module"], match["ab"] or match["eab"]
        if match["magnitude"]:  # DoRA: PEFT's (1, out, 1...) for convolutions, ours (out,)
            ours[f"{module}.lora_magnitude"] = tensor.reshape(-1)
            continue
        if module.endswith(".base_layer.out_proj"):  # nn.MultiheadAttention's out_proj update
            warnings.warn(MHA_BUG.format(name=module.removesuffix(".base_layer.out_proj")) + " We load the update "
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
            target_modules="|".join(_exact(n) for n in ranks) if ranks else [],
            target_parameters=[f"{o}.{p}" for o, names in _parameter_owners(model, targets).items() for p in names]
            or None,
            rslora=bool(config.get("use_rslora")),
            rank_pattern={_exact(n): r for n, r in ranks.items() if r != config["r"]},
            alpha_pattern={_exact(n): float(a) for n, a in alphas.items() if a != config["lora_alpha"]},
            trainable_modules=[_exact(n) for n in saved] or None, dora=bool(config.get("use_dora")),
        ))
    return _copy_in(model, ours)


def _parameter_owners(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """Module name → the parameters ``targets`` selects there, in the module's own order (PEFT's nesting order)."""
    if not targets:
        return {}
    adapted = {name: adapter for name, adapter in adapters(model) if isinstance(adapter, LoRAParameters)}
    if adapted:  # already injected: the parameters sit under base_layer
        return {name: [p for p in a.base_layer._parameters if p in a.lora_A] for name, a in adapted.items()}
    owners: dict[str, list[str]] = {}
    for owner, local in select_parameters(model, targets):
        owners.setdefault(owner, []).append(local)
    return owners


def _parameters_from_peft(model: nn.Module, targets: list[str], state: dict[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """Our ``target_parameters`` factors from PEFT's nested wrappers' tensors (removed from ``state``)."""
    ours = {}
    for owner, names in _parameter_owners(model, targets).items():
        module = innermost(model.get_submodule(owner))
        for key, theirs in peft_parameter_keys(owner, names).items():
            if theirs not in state:
                raise AdapterStateError(f"the PEFT file lacks {theirs}, the LoRA factor of {owner}.{key.split('.')[1]} "
                                        "its target_parameters name; it was saved for another model.")
            parameter = module._parameters[key.split(".")[1]]
            experts = parameter.shape[0] if parameter is not None and parameter.dim() == 3 else 1
            ours[f"{owner}.{key}"] = experts_from_peft(key[5], state.pop(theirs), experts)
    return ours


def _peft_pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` wins."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _copy_in(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    return load_adapter_state_dict(model, state)


def _load_prompt(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError("this PEFT prompt was made for an encoder-decoder (num_transformer_submodules=2), a layout "
                         "lightning_peft does not read; its token prompts on encoder-decoders prompt the encoder only.")
    p = int(config["num_virtual_tokens"])
    if not any(isinstance(a, TokenPrompt) for _, a in adapters(model)):
        inject(model, PromptTuningConfig(num_tokens=p, kind="tokens"))
    prompts = [(n, a) for n, a in adapters(model) if isinstance(a, TokenPrompt)]
    return _copy_in(model, {f"{prompts[0][0]}.prompt": state["prompt_embeddings"][:p]})


def _load_prefix(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
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

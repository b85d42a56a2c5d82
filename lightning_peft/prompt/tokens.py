r"""Token prompts (Lester et al. 2021, https://arxiv.org/abs/2104.08691): ``p`` learned vectors in front of the
input embeddings of a language model.

::

    input_ids (B, n) ──► embedding ──► [ P (p, d) | E (n, d) ] ──► model ──► outputs on p+n positions
                                                                            └► virtual positions stripped: n
    attention_mask  [ 1…1 | mask ]      token_type_ids [ 0…0 | ids ]      position_ids [ 0…p-1 | ids + p ]
    labels          [ -100…-100 | labels ]   (causal LMs: the first real label too, see below)

For a transformers model the adapter wraps the input embedding (that is where its parameter lives) and two
hooks on the model rewrite the call: the forward pre-hook embeds ``input_ids`` itself, prepends the prompt
and extends every sequence-aligned input; the forward hook cuts the ``p`` virtual positions out of logits,
hidden states and attentions, so outputs line up with the user's tokens. For causal LMs the label of the
first real token is also masked: the loss then covers exactly the predictions the stripped logits make
(the base model's loss on real tokens). With ``keep_virtual_outputs=True`` outputs keep all ``p + n``
positions and the first real token is predicted from the prompt (as in HF PEFT).

Generation: the prompt enters once, at the prefill (an empty or absent cache); decoding steps find it in the
KV cache and only get their masks and positions shifted by ``p``. Encoder-decoders (T5, BART) prompt the
encoder: a hook on the encoder prepends the prompt (``generate()`` calls the encoder directly), and the
model's hook widens the encoder attention mask so cross-attention sees the prompt.

For a model of your own, name its ``nn.Embedding`` (``embedding="embed"``): the prompt is then prepended to
that embedding's output and the rest of your model sees ``p + n`` positions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from lightning_peft.adapter import innermost
from lightning_peft.errors import TargetNotFoundError
from lightning_peft.participation import took_part
from lightning_peft.prompt.base import PromptAdapter
from lightning_peft.record import add_peft_hook
from lightning_peft.targets import is_inside
from lightning_peft.zero3 import gathered, global_shape

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100  # the label value every transformers loss ignores
_CACHE_KEYS = ("cache", "past_key_values")  # transformers 5 renames past_key_values to cache
_DECODER_OUTPUT_KEYS = ("cross_attentions",)
#: Model class name endings whose labels hold one target per sequence, never extended.
_SEQUENCE_LEVEL_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction")
#: Inputs aligned with the token sequence, cut together when truncating.
_SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids", "labels")
#: What a forward pre-hook returns to replace the call: no positional arguments, every input by keyword.
_NewCall = tuple[tuple[()], dict[str, Any]]


class TokenPrompt(PromptAdapter):
    """``num_tokens`` learned embeddings, wrapping the input embedding whose rows they imitate.

    Args:
        embedding: The model's input embedding (an ``nn.Embedding``, possibly inside other adapters).
        num_tokens: Number of virtual tokens ``p``.
        init: ``"random"`` (normal with the standard deviation of the embedding's weights), ``"vocab"``
            (embeddings of ``p`` vocabulary rows drawn with the seed) or ``"text"`` (embeddings of ``init_ids``,
            repeated to ``p`` tokens).
        init_ids: Token ids of the init text (``init="text"``).
        seed: Seed of the initialisation.
        prepend_output: Prepend the prompt to this embedding's output (models of your own); transformers
            models leave it off and prompt through hooks on the model instead.
    """

    fsdp_unit: ClassVar[bool] = False  # the model hooks read the prompt outside this module's forward

    def __init__(
        self, embedding: nn.Module, num_tokens: int, init: str = "random", init_ids: list[int] | None = None,
        seed: int = 0, prepend_output: bool = False,
    ) -> None:
        super().__init__(embedding, seed)
        weight = cast(torch.Tensor, innermost(embedding).weight)
        self.num_tokens = num_tokens
        self.init = init
        self.init_ids = list(init_ids or [])
        self.prepend_output = prepend_output
        self.keep_virtual_outputs = False
        self.causal = False
        self.token_labels = True  # labels align with the tokens (LM, token classification), not one per sequence
        self.max_length: int | None = None
        self.truncation: str | None = None
        self._real_length: int | None = None  # set by the pre-hook for the post-hook of the same call
        self.prompt = self.new_parameter(num_tokens, global_shape(weight)[1], like=weight)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        weight = cast(torch.Tensor, innermost(self.base_layer).weight)
        if self.prompt.is_meta or weight.is_meta:
            return  # materialised later by the strategy, which calls reset_parameters() again
        generator = self.generator()
        # whole under DeepSpeed ZeRO-3 (read the embedding, write the prompt back to every rank), else as they are
        with gathered([weight]), gathered([self.prompt], modifier_rank=0):
            if self.init == "random":
                std = weight.detach().float().std().item()
                values = torch.randn(self.prompt.shape, generator=generator) * std
            else:
                vocab = weight.shape[0]
                ids = torch.randint(vocab, (self.num_tokens,), generator=generator) if self.init == "vocab" else (
                    torch.tensor(self.init_ids * math.ceil(self.num_tokens / len(self.init_ids)))[: self.num_tokens]
                )
                values = self.base_layer(ids.to(weight.device))
            self.prompt.copy_(values)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        embeds = self.base_layer(input, *args, **kwargs)
        return self.prepend(embeds) if self.prepend_output and self.enabled else embeds

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[prompt | embeds]`` along the sequence axis: ``(B, n, d)`` → ``(B, p + n, d)``."""
        took_part(self)
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompt, embeds], dim=1)

    # --- hooks on a transformers decoder-only or encoder-only model -----------------------------------------
    def model_pre_hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _NewCall | None:
        """Prefill: embed, prepend the prompt, extend the inputs. Decoding: shift masks and positions by ``p``."""
        self._real_length = None
        if not self.enabled:
            return None
        call = bind_call(model, args, kwargs)
        past = cache_length(call)
        if past > 0:
            took_part(self)  # the prompt is in the cache the model reads
            _extend_for_cached_prompt(call, self.num_tokens, past, self.max_length)
            return (), call
        embeds = self._embed(model, call)
        if embeds is None:
            return None
        n = self._fit(call, embeds.shape[1], type(model).__name__)
        call["inputs_embeds"] = self.prepend(call["inputs_embeds"])
        extend_inputs(call, self.num_tokens, n, labels=self.token_labels,
                      mask_first_label=self.causal and not self.keep_virtual_outputs)
        self._real_length = n
        return (), call

    def model_post_hook(self, model: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        """Cut the virtual positions out of the outputs (unless ``keep_virtual_outputs``)."""
        return self._strip(output, keys=None)

    def _strip(self, output: Any, keys: Callable[[str], bool] | None) -> Any:
        n, self._real_length = self._real_length, None
        if n is None or self.keep_virtual_outputs:
            return None
        return strip_outputs(output, self.num_tokens, self.num_tokens + n, keys=keys)

    # --- hooks on a transformers encoder-decoder --------------------------------------------------------------
    def encoder_pre_hook(self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _NewCall | None:
        """Prepend the prompt to the encoder input (also when ``generate()`` calls the encoder itself)."""
        if not self.enabled:
            return None
        call = bind_call(encoder, args, kwargs)
        embeds = self._embed(encoder, call)
        if embeds is None:
            return None
        n = self._fit(call, embeds.shape[1], type(encoder).__name__)
        call["inputs_embeds"] = self.prepend(call["inputs_embeds"])
        mask = call.get("attention_mask")
        extend_inputs(call, self.num_tokens, n, labels=False, mask_first_label=False,
                      skip_mask=mask is not None and mask.shape[-1] == n + self.num_tokens)  # widened by the model
        return (), call

    def seq2seq_pre_hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _NewCall | None:
        """Widen the encoder attention mask by ``p`` columns, so the decoder's cross-attention sees the prompt."""
        self._real_length = None
        if not self.enabled:
            return None
        call = bind_call(model, args, kwargs)
        encoded = call.get("encoder_outputs")
        if encoded is None:
            source = _sequence(call)
            if source is None:
                return None
            keys = ("input_ids", "inputs_embeds", "attention_mask")  # labels belong to the decoder
            n = self._fit(call, source.shape[1], type(model).__name__, keys=keys)
            self._real_length = n
        else:
            took_part(self)  # the prompt is in the encoder outputs the decoder reads
            n = encoded[0].shape[1] - self.num_tokens
        mask = call.get("attention_mask")
        if mask is not None and mask.shape[-1] == n:
            call["attention_mask"] = _prepend_value(mask, self.num_tokens, 1)
        return (), call

    def seq2seq_post_hook(self, model: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        """Cut the virtual positions out of the encoder outputs the model returns."""
        return self._strip(output, keys=_encoder_side)

    # --- helpers ----------------------------------------------------------------------------------------------
    def _embed(self, model: PreTrainedModel, call: dict[str, Any]) -> torch.Tensor | None:
        if call.get("inputs_embeds") is None:
            ids = call.get("input_ids")
            if ids is None:
                return None
            call["inputs_embeds"] = model.get_input_embeddings()(ids)
        call["input_ids"] = None
        return call["inputs_embeds"]

    def _fit(self, call: dict[str, Any], n: int, model_name: str, keys: tuple[str, ...] | None = None) -> int:
        """Check ``n + p`` against the maximum length; truncate the real tokens if a side was chosen."""
        p, limit = self.num_tokens, self.max_length
        if limit is None or n + p <= limit:
            return n
        if self.truncation is None:
            raise ValueError(
                f"{n} input tokens plus {p} prompt tokens exceed {model_name}'s maximum length of {limit}. "
                f"Shorten the inputs to at most {limit - p} tokens, or pass truncation='left' or 'right' to "
                "PromptTuning to drop real tokens from that side."
            )
        keep = limit - p
        part = slice(n - keep, n) if self.truncation == "left" else slice(0, keep)
        for key in keys or _SEQUENCE_KEYS:
            value = call.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n:
                call[key] = value[:, part]
        return keep


def _encoder_side(key: str) -> bool:
    """Whether an encoder-decoder output field has the encoder's (prompted) positions."""
    return key.startswith("encoder_") or key in _DECODER_OUTPUT_KEYS


def bind_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a ``module(...)`` call as keywords (positional ones named by ``forward``'s signature)."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    call: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(module).__name__}.forward takes *{name}; token prompts need named inputs.")
        else:
            call[name] = value
    return call


def cache_length(call: dict[str, Any]) -> int:
    """Positions already held by the KV cache passed in the call (0 without one)."""
    cache = next((call[key] for key in _CACHE_KEYS if call.get(key) is not None), None)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuples: (layers) of (key, value), key (B, heads, length, d)
    return 0


def _sequence(call: dict[str, Any]) -> torch.Tensor | None:
    ids = call.get("input_ids")
    return ids if ids is not None else call.get("inputs_embeds")


def _prepend_value(tensor: torch.Tensor, p: int, value: int) -> torch.Tensor:
    front = torch.full((*tensor.shape[:-1], p), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([front, tensor], dim=-1)


def _check_2d_mask(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(
            f"token prompts extend 2-D attention masks (batch, length); got a mask of shape {tuple(mask.shape)}. "
            "Pass the 2-D padding mask and let the model build its attention mask."
        )


def extend_inputs(
    call: dict[str, Any], p: int, n: int, labels: bool, mask_first_label: bool, skip_mask: bool = False
) -> None:
    """Make the sequence-aligned inputs of a prefill cover the ``p`` virtual tokens in front of ``n`` real ones."""
    mask = call.get("attention_mask")
    if mask is not None and not skip_mask:
        _check_2d_mask(mask)
        call["attention_mask"] = _prepend_value(mask, p, 1)
    if call.get("token_type_ids") is not None:
        call["token_type_ids"] = _prepend_value(call["token_type_ids"], p, 0)
    positions = call.get("position_ids")
    if positions is not None:  # virtual tokens take positions 0..p-1, real tokens move up by p
        virtual = torch.arange(p, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], p)
        call["position_ids"] = torch.cat([virtual, positions + p], dim=-1)
    target = call.get("labels")
    if labels and isinstance(target, torch.Tensor) and target.dim() == 2 and target.shape[1] == n and (
        not target.is_floating_point()  # float labels are per-sequence targets (multi-label, regression)
    ):
        extended = _prepend_value(target, p, IGNORE_INDEX)
        if mask_first_label:  # a causal LM shifts labels: the last virtual position would predict token 0
            extended[:, p] = IGNORE_INDEX
        call["labels"] = extended


def _extend_for_cached_prompt(call: dict[str, Any], p: int, past: int, limit: int | None) -> None:
    """A decoding step: the prompt is in the cache; widen the mask and move positions past the prompt."""
    new = _sequence(call)
    length = new.shape[1] if new is not None else 0
    if limit is not None and past + length > limit:
        raise ValueError(
            f"generation reached {past + length} positions ({p} of them prompt tokens), beyond the model's "
            f"maximum length of {limit}; lower max_new_tokens or shorten the inputs."
        )
    mask = call.get("attention_mask")
    if mask is not None:
        _check_2d_mask(mask)
        if mask.shape[-1] == past - p + length:  # the caller's mask covers its own tokens only
            call["attention_mask"] = _prepend_value(mask, p, 1)
    if call.get("position_ids") is not None:
        call["position_ids"] = call["position_ids"] + p


def _strip_tensor(key: str, value: torch.Tensor, p: int, total: int) -> torch.Tensor:
    if "attentions" in key and value.dim() == 4 and value.shape[-1] == total:  # (B, heads, queries, keys)
        return value[..., p:] if key in _DECODER_OUTPUT_KEYS else value[..., p:, p:]
    per_token = value.dim() >= 3 or key in ("start_logits", "end_logits")  # (B, L, ...) vs pooled (B, C)
    if per_token and value.dim() >= 2 and value.shape[1] == total:
        return value[:, p:]
    return value


def _strip_value(key: str, value: Any, p: int, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return _strip_tensor(key, value, p, total)
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_strip_tensor(key, v, p, total) for v in value)
    return value


def strip_outputs(output: Any, p: int, total: int, keys: Callable[[str], bool] | None) -> Any:
    """Remove the ``p`` virtual positions from a model output (a ``ModelOutput``, tuple or tensor)."""
    if isinstance(output, dict):  # transformers ModelOutput: per-field, by name
        for key in list(output.keys()):
            if key in _CACHE_KEYS or (keys is not None and not keys(key)):
                continue
            output[key] = _strip_value(key, output[key], p, total)
        return output
    if keys is not None:
        return output  # a tuple from an encoder-decoder: fields cannot be told apart safely
    if isinstance(output, tuple):
        return tuple(_strip_value("", value, p, total) for value in output)
    return _strip_value("", output, p, total)


# --- attaching ---------------------------------------------------------------------------------------------------
def transformers_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers ``PreTrainedModel`` modules in ``model`` (``[]`` without transformers)."""
    import sys

    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    if base is None:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, base) and not is_inside(name, (outer for outer, _ in found)):
            found.append((name, module))
    return found


def token_hosts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers models in ``model`` whose input embedding is an ``nn.Embedding`` (where token prompts go)."""
    hosts = []
    for name, host in transformers_models(model):
        get = getattr(host, "get_input_embeddings", None)
        try:
            embedding = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            embedding = None
        if embedding is not None and isinstance(innermost(embedding), nn.Embedding):
            hosts.append((name, host))
    return hosts


def host_embedding(model: nn.Module, host: PreTrainedModel) -> tuple[str, nn.Module]:
    """The name and module of a transformers model's input embedding, where its token prompt goes.

    Raises:
        TargetNotFoundError: An encoder-decoder whose encoder takes no tokens (Whisper): the prompt would train nothing.
    """
    embedding = host.get_input_embeddings()
    if getattr(host.config, "is_encoder_decoder", False):
        _check_encoder_takes_tokens(host, embedding)
    return next(name for name, module in model.named_modules() if module is embedding), embedding


def init_ids(init: str, init_text: str | None, tokenizer: str | None) -> list[int] | None:
    """Token ids whose embeddings start a prompt (``init="text"``), read with the named tokenizer."""
    if init != "text":
        return None
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer)(init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text={init_text!r} tokenizes to no tokens with {tokenizer!r}; pass a non-empty text.")
    return list(ids)


def prompted_length_limit(host: PreTrainedModel) -> int | None:
    """The most tokens, prompt included, that ``host`` (or its encoder) takes: ``max_position_embeddings``, if set."""
    config = host.config
    if getattr(config, "is_encoder_decoder", False):
        config = getattr(config, "encoder", config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def hook_into_transformers(adapter: TokenPrompt, host: PreTrainedModel) -> None:
    """Let a transformers model's forward (and its encoder's) extend inputs for, and strip outputs of, the prompt.

    Raises:
        ValueError: The prompt alone fills the model's maximum length (no position is left for real tokens).
    """
    hf_config = host.config
    adapter.max_length = prompted_length_limit(host)
    if adapter.max_length is not None and adapter.num_tokens >= adapter.max_length:
        raise ValueError(
            f"num_tokens={adapter.num_tokens} leaves no position for real tokens: {type(host).__name__} takes at most "
            f"{adapter.max_length} tokens (max_position_embeddings). Pass num_tokens below {adapter.max_length}, "
            "leaving room for your inputs."
        )
    if getattr(hf_config, "is_encoder_decoder", False):
        encoder = host.get_encoder()
        add_peft_hook(encoder, encoder.register_forward_pre_hook(adapter.encoder_pre_hook, with_kwargs=True))
        add_peft_hook(host, host.register_forward_pre_hook(adapter.seq2seq_pre_hook, with_kwargs=True))
        add_peft_hook(host, host.register_forward_hook(adapter.seq2seq_post_hook, with_kwargs=True))
    else:
        adapter.causal = bool(host.can_generate())
        adapter.token_labels = not type(host).__name__.endswith(_SEQUENCE_LEVEL_HEADS)
        add_peft_hook(host, host.register_forward_pre_hook(adapter.model_pre_hook, with_kwargs=True))
        add_peft_hook(host, host.register_forward_hook(adapter.model_post_hook, with_kwargs=True))


def _check_encoder_takes_tokens(host: PreTrainedModel, embedding: nn.Module) -> None:
    """Refuse an encoder-decoder whose encoder does not embed the tokens (Whisper's encoder takes audio features):
    a prompt on the decoder's embedding would never reach the encoder, so it would train nothing."""
    get = getattr(host.get_encoder(), "get_input_embeddings", None)
    try:
        encoder_embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        encoder_embedding = None
    weight = None if encoder_embedding is None else getattr(innermost(encoder_embedding), "weight", None)
    if weight is None or weight is not innermost(embedding).weight:  # T5, BART: a tied copy of the embedding
        raise TargetNotFoundError(
            f"token prompts go in front of the encoder's input tokens, but {type(host).__name__}'s encoder takes no "
            f"tokens (its input embedding is {type(encoder_embedding).__name__}, not the token embedding "
            f"{type(embedding).__name__}). Use prefix tuning (PrefixTuning) or LoRA for this model."
        )


def named_embedding(model: nn.Module, name: str) -> nn.Module:
    """The ``nn.Embedding`` named ``name`` (``embedding=`` of a model of your own), whose output gains the prompt.

    Raises:
        ValueError: ``name`` names no module, or a module that is not an ``nn.Embedding``.
    """
    try:
        embedding = model.get_submodule(name)
    except AttributeError:
        embedding = None
    if embedding is None or not isinstance(innermost(embedding), nn.Embedding):
        found = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        seen = "no module" if embedding is None else f"a {type(embedding).__name__}"
        raise ValueError(
            f"embedding={name!r} names {seen} in {type(model).__name__}; token prompts need the nn.Embedding "
            f"that embeds the input tokens. nn.Embedding modules here: {found or 'none'}."
        )
    return embedding

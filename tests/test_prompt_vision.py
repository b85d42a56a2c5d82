"""Patch-token prompts for ViTs (VPT) and pixel prompts for image models (lightning_peft.prompt.patches/pixels)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from lightning_peft import PromptTuningConfig, inject, load_adapter, save_adapter  # noqa: E402
from lightning_peft.prompt import PatchPrompt, PixelPrompt  # noqa: E402

P, SIZE = 3, 32


def torchvision_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: nothing would reach the input
    return model


def timm_vit() -> nn.Module:  # two register tokens and average pooling: prompts go after 3 prefix tokens
    return timm.models.vision_transformer.VisionTransformer(
        img_size=SIZE, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, reg_tokens=2,
        global_pool="avg").eval()


def hf_vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(config).eval()


def plain(block: nn.Module) -> nn.Module:
    return block.base_layer if isinstance(block, PatchPrompt) else block


def blocks_by_hand(blocks: list[nn.Module], tokens: torch.Tensor, prompts: list[torch.Tensor], start: int) -> torch.Tensor:
    """VPT written out: insert at block 0, overwrite before each later block (deep), remove after the last."""
    b = tokens.shape[0]
    for i, block in enumerate(blocks):
        if i == 0:
            tokens = torch.cat([tokens[:, :start], prompts[0].expand(b, -1, -1), tokens[:, start:]], 1)
        elif i < len(prompts):
            tokens = torch.cat([tokens[:, :start], prompts[i].expand(b, -1, -1), tokens[:, start + P:]], 1)
        tokens = plain(block)(tokens)
    return torch.cat([tokens[:, :start], tokens[:, start + P:]], 1)


def torchvision_by_hand(model: nn.Module, image: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    x = model._process_input(image)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1) + model.encoder.pos_embedding
    x = model.encoder.ln(blocks_by_hand(list(model.encoder.layers), x, prompts, 1))
    return model.heads(x[:, 0])


def timm_by_hand(model: nn.Module, image: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    x = model.norm_pre(model._pos_embed(model.patch_embed(image)))
    x = model.norm(blocks_by_hand(list(model.blocks), x, prompts, model.num_prefix_tokens))
    return model.forward_head(x)


def hf_by_hand(model: nn.Module, image: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    x = model.vit.embeddings(image)
    x = model.vit.layernorm(blocks_by_hand(list(model.vit.layers), x, prompts, 1))
    return model.classifier(x[:, 0])


FAMILIES = {
    "torchvision": (torchvision_vit, torchvision_by_hand, lambda out: out),
    "timm": (timm_vit, timm_by_hand, lambda out: out),
    "transformers": (hf_vit, hf_by_hand, lambda out: out.logits),
}


def patch_prompts(model: nn.Module) -> list[torch.Tensor]:
    return [m.prompt for m in model.modules() if isinstance(m, PatchPrompt) and m.prompt is not None]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("deep", [False, True])
def test_patch_prompts_equal_vpt_written_out_after_class_token_and_positions(family: str, deep: bool) -> None:
    build, by_hand, logits = FAMILIES[family]
    torch.manual_seed(0)
    model = inject(build(), PromptTuningConfig(num_tokens=P, deep=deep))
    prompts = patch_prompts(model)
    assert len(prompts) == (3 if deep else 1)
    assert all(p.shape == (P, 32) and p.requires_grad for p in prompts)
    image = torch.randn(2, 3, SIZE, SIZE)
    out = logits(model(image))
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, by_hand(model, image, prompts), atol=1e-5, rtol=1e-5)


def test_deep_prompts_differ_per_block_and_reset_restores_them() -> None:
    model = inject(timm_vit(), PromptTuningConfig(num_tokens=P, deep=True, seed=1))
    prompts = [p.detach().clone() for p in patch_prompts(model)]
    assert not torch.equal(prompts[0], prompts[1])
    again = inject(timm_vit(), PromptTuningConfig(num_tokens=P, deep=True, seed=1))
    for module in again.modules():
        if isinstance(module, PatchPrompt) and module.prompt is not None:
            with torch.no_grad():
                module.prompt.zero_()
            module.reset_parameters()
    for mine, theirs in zip(prompts, patch_prompts(again)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_keep_virtual_outputs_leaves_prompt_tokens_in_the_sequence() -> None:
    model = inject(timm_vit(), PromptTuningConfig(num_tokens=P, keep_virtual_outputs=True))
    tokens = model.forward_features(torch.randn(1, 3, SIZE, SIZE))
    assert tokens.shape == (1, 3 + P + 16, 32)  # class + 2 registers, prompts, 4x4 patches


@pytest.mark.parametrize("config", [
    {"num_tokens": P, "deep": True},
    {"kind": "pixels", "width": 4},
    {"kind": "pixels", "pixel_region": "full"},
])
def test_every_prompt_parameter_gets_a_gradient_each_step(config: dict) -> None:
    model = inject(torchvision_vit(), PromptTuningConfig(**config))
    model(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), trainable


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def written_out_border(adapter: PixelPrompt, w: int) -> torch.Tensor:
    pattern = torch.zeros(3, SIZE, SIZE)
    pattern[:, :w, :] = adapter.prompt_top
    pattern[:, -w:, :] = adapter.prompt_bottom
    pattern[:, w:-w, :w] = adapter.prompt_left
    pattern[:, w:-w, -w:] = adapter.prompt_right
    return pattern


def test_pixel_border_prompt_equals_base_model_on_image_plus_border() -> None:
    base = resnet()
    model = inject(copy.deepcopy(base), PromptTuningConfig(kind="pixels", width=4, image_size=SIZE))
    image = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(model(image), base(image))  # zero at init: the frozen model
    adapter = model.conv1
    with torch.no_grad():
        for param in adapter.parameters(recurse=False):
            param.normal_()
    pattern = written_out_border(adapter, 4)
    assert pattern[:, 4:-4, 4:-4].abs().sum() == 0
    torch.testing.assert_close(model(image), base(image + pattern), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in adapter.parameters(recurse=False)) == 3 * 2 * 4 * (SIZE + SIZE - 2 * 4)


def test_full_image_pixel_prompt_adds_one_learned_image() -> None:
    base = resnet()
    model = inject(copy.deepcopy(base), PromptTuningConfig(kind="pixels", pixel_region="full", image_size=[SIZE, SIZE]))
    with torch.no_grad():
        model.conv1.prompt.normal_()
    image = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(model(image), base(image + model.conv1.prompt), atol=1e-5, rtol=1e-5)


def test_pixel_prompt_reads_the_image_size_a_vit_declares() -> None:
    model = inject(hf_vit(), PromptTuningConfig(kind="pixels", width=2))
    adapter = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(adapter, PixelPrompt) and adapter.size == (SIZE, SIZE)
    assert model(torch.randn(1, 3, SIZE, SIZE)).logits.shape == (1, 5)


def test_only_pixel_prompt_changes_after_training_and_batchnorm_statistics_stay() -> None:
    model = inject(resnet(), PromptTuningConfig(kind="pixels", width=4, image_size=SIZE)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"conv1.prompt_{side}" for side in ("top", "bottom", "left", "right")}


def test_saved_deep_patch_prompts_load_into_a_fresh_vit(tmp_path) -> None:
    base = timm_vit()
    model = inject(copy.deepcopy(base), PromptTuningConfig(num_tokens=P, deep=True, seed=5))
    with torch.no_grad():
        for prompt in patch_prompts(model):
            prompt.add_(1.0)
    save_adapter(model, tmp_path)
    restored = load_adapter(copy.deepcopy(base), tmp_path)
    image = torch.randn(1, 3, SIZE, SIZE)
    torch.testing.assert_close(restored(image), model(image))


def test_pixel_prompt_errors_say_what_to_pass() -> None:
    any_size = inject(resnet(), PromptTuningConfig(kind="pixels", width=6))  # the issue's own spelling
    with pytest.raises(ValueError, match=r"width 6 leaves nothing inside a 12x12 input; use inputs larger than "
                                         r"12x12, or inject with a width below 6 or region='full'"):
        any_size(torch.randn(1, 3, 12, 12))
    with pytest.raises(ValueError, match=r"border of width 16 leaves nothing inside a 32x32 image.*below 16"):
        inject(resnet(), PromptTuningConfig(kind="pixels", width=16, image_size=SIZE))
    with pytest.raises(ValueError, match=r"image_module='stem' is not a module of ResNet; its Conv2d layers are \['conv1'"):
        inject(resnet(), PromptTuningConfig(kind="pixels", image_size=SIZE, image_module="stem"))
    model = inject(resnet(), PromptTuningConfig(kind="pixels", width=4, image_size=SIZE))
    with pytest.raises(ValueError, match=r"made for 32x32 images; got an input of shape \(1, 3, 40, 40\)"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="found no torchvision, timm or transformers VisionTransformer in ResNet"):
        inject(resnet(), PromptTuningConfig(kind="patches"))


def test_kind_is_detected_from_the_model() -> None:
    from lightning_peft.prompt import detect_kind

    assert detect_kind(hf_vit()) == "patches"
    assert detect_kind(resnet()) == "pixels"
    assert detect_kind(transformers.BertModel(transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))) == "tokens"


def moved_pixel_prompt(model: nn.Module) -> PixelPrompt:
    prompt = next(m for m in model.modules() if isinstance(m, PixelPrompt))
    with torch.no_grad():
        for param in prompt.parameters(recurse=False):
            param.copy_(torch.randn_like(param))
    return prompt


def test_pixel_prompt_takes_any_input_size_without_image_size() -> None:
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=4).eval()
    model = inject(copy.deepcopy(base), PromptTuningConfig(kind="pixels", width=2))
    prompt = next(m for m in model.modules() if isinstance(m, PixelPrompt))
    shapes = [tuple(p.shape) for p in prompt.parameters(recurse=False)]
    assert shapes == [(3, 2, 224), (3, 2, 224), (3, 220, 2), (3, 220, 2)]  # fixed, whatever the inputs
    for size in (12, 32, 64, 224, 32, 12, 64):  # variable sizes between batches
        image = torch.randn(2, 3, size, size)
        torch.testing.assert_close(model(image), base(image), rtol=0, atol=0)  # identity at init
    moved_pixel_prompt(model)
    for size in (12, 32, 64, 224):
        image = torch.randn(2, 3, size, size)
        model.zero_grad()
        out = model(image)
        assert (out - base(image)).abs().max() > 1e-3
        out.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompt.parameters(recurse=False))
    with torch.no_grad():  # the added pattern: strips resized along the edge only, zero inside, width exactly 2
        pattern = prompt.pattern((12, 20))
        top = torch.nn.functional.interpolate(prompt.prompt_top.reshape(1, 6, 224), size=20, mode="linear",
                                              align_corners=True).reshape(3, 2, 20)
        left = torch.nn.functional.interpolate(prompt.prompt_left.transpose(1, 2).reshape(1, 6, 220), size=8,
                                               mode="linear", align_corners=True).reshape(3, 2, 8).transpose(1, 2)
        torch.testing.assert_close(pattern[:, :2], top)
        torch.testing.assert_close(pattern[:, 2:10, :2], left)
        assert pattern[:, 2:10, 2:18].abs().max() == 0
        torch.testing.assert_close(prompt.pattern((224, 224)), prompt.pattern())  # the reference size: as learned
        corner = prompt.prompt_top[:, :, [0, -1]]  # corners aligned: the strip's ends stay at the image's corners
        torch.testing.assert_close(prompt.pattern((32, 48))[:, :2][:, :, [0, -1]], corner)


def test_pixel_prompt_any_size_full_region_and_save_load(tmp_path) -> None:
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=4).eval()
    model = inject(copy.deepcopy(base), PromptTuningConfig(kind="pixels", pixel_region="full"))
    image = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(model(image), base(image), rtol=0, atol=0)
    prompt = moved_pixel_prompt(model)
    with torch.no_grad():
        expected = base(image + torch.nn.functional.interpolate(prompt.prompt[None], size=(40, 40),
                                                                mode="bilinear", align_corners=True))
    torch.testing.assert_close(model(image), expected)
    border = inject(copy.deepcopy(base), PromptTuningConfig(kind="pixels", width=3))
    moved_pixel_prompt(border)
    for saved in (model, border):
        save_adapter(saved, tmp_path / str(id(saved)))
        restored = load_adapter(copy.deepcopy(base), tmp_path / str(id(saved)))
        for size in (16, 50):
            image = torch.randn(2, 3, size, size)
            torch.testing.assert_close(restored(image), saved(image), rtol=0, atol=0)

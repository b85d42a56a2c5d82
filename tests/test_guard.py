"""Every enabled adapter takes part in every mode, and the participation check says so when one does not."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft import LoRAConfig, PrefixTuningConfig, inject, participation_check, unload
from lightning_peft.errors import ParticipationError, PEFTWarning

TOL = dict(atol=1e-5, rtol=1e-5)


def _move_adapters(model: nn.Module) -> None:
    """Non-zero B factors, so every LoRA adapter changes its layer's output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_out_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _encoder(norm_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2)


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)


@pytest.mark.parametrize("norm_first", [False, True])
def test_lora_on_transformer_encoder_layers_applies_in_eval_and_under_no_grad(norm_first: bool) -> None:
    # torch's eval fast path (torch._transformer_encoder_layer_fwd) reads linear1.weight & co. itself
    base = _encoder(norm_first).eval()
    model = inject(_encoder(norm_first), LoRAConfig(r=4, target_modules=["self_attn", "linear1", "linear2"]))
    _move_adapters(model)
    x, padding = torch.randn(3, 6, 32), torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    train = model.train()(x, src_key_padding_mask=padding)
    model.eval()
    with torch.no_grad():
        frozen = base(x, src_key_padding_mask=padding)
        outputs = {"eval under no_grad": model(x, src_key_padding_mask=padding)}
        with torch.inference_mode():
            outputs["inference_mode"] = model(x, src_key_padding_mask=padding)
    outputs["eval"] = model(x, src_key_padding_mask=padding)
    real = ~padding
    assert (train[real] - frozen[real]).abs().max() > 0.1  # the adapters change the model
    for mode, out in outputs.items():
        torch.testing.assert_close(out[real], train[real], **TOL, msg=mode)


def test_lora_on_transformer_decoder_layer_and_multihead_attention_applies_in_every_mode() -> None:
    model = inject(_decoder(), LoRAConfig(r=4, target_modules=["self_attn", "multihead_attn", "linear1"]))
    _move_adapters(model)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    train = model.train()(x, memory)
    model.eval()
    torch.testing.assert_close(model(x, memory), train, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(x, memory), train, **TOL)
        assert (_decoder().eval()(x, memory) - train).abs().max() > 0.1


def test_unload_gives_the_encoder_its_fused_path_back() -> None:
    model = inject(_encoder(False), LoRAConfig(r=2, target_modules=["linear1"]))
    assert not model.use_nested_tensor and all(layer._forward_pre_hooks for layer in model.layers)
    plain = unload(model)
    assert plain.use_nested_tensor and not any(layer._forward_pre_hooks for layer in plain.layers)


class Reader(nn.Module):
    """Reads its child's weight itself instead of calling it (as torchvision's Swin attention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj.weight, self.proj.bias)


def test_a_layer_whose_weight_is_read_by_its_parent_raises_naming_it_and_the_fix() -> None:
    model = inject(nn.Sequential(Reader(), nn.ReLU()), LoRAConfig(r=2, target_modules=["0.proj"]))
    with pytest.raises(ParticipationError, match=r"(?s)LoRA adapter '0.proj' was not called, yet bias, weight were "
                                                 r"read through it: Reader '0' uses 'proj' without calling it.*"
                                                 r"register_weight_reader\(Reader, \['proj'\]\).*participation_check"):
        model(torch.randn(2, 4))
    assert not nn.modules.module._global_forward_pre_hooks  # the watch hook is gone after the check
    participation_check(model, False)
    model(torch.randn(2, 4))  # switched off: no error


def test_each_mode_is_checked_once_and_then_costs_no_watch_hook() -> None:
    class EvalReader(Reader):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) if self.training else super().forward(x)

    model = inject(nn.Sequential(EvalReader()), LoRAConfig(r=2, target_modules=["0.proj"]))
    seen: list[int] = []
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.append(1))
    try:
        model.train()(torch.randn(2, 4))
        first = len(seen)
        model(torch.randn(2, 4))
        assert len(seen) - first == first  # the same module calls, and no second watch window
    finally:
        handle.remove()
    for _ in range(2):  # an unfixed cause raises on every forward of that mode, not only the first
        with pytest.raises(ParticipationError, match=r"\(eval\)"):
            model.eval()(torch.randn(2, 4))


def test_an_adapter_whose_tensors_never_enter_the_computation_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from lightning_peft.prefix.attention import transformers_attention

    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=16)
    model = inject(transformers.GPT2Model(config), PrefixTuningConfig(num_tokens=2))
    # as if a transformers release no longer called the attention interface we prepend at
    monkeypatch.setattr(transformers_attention, "_prefixed_call", lambda inner, name, module, *a, **k: inner(
        module, *a, **k))  # (the overrides stay in the registry: they call this name at every call)
    with pytest.raises(ParticipationError, match="ran, but its tensors never entered the computation"):
        model(torch.randint(0, 20, (1, 5)))


def test_an_adapter_whose_module_did_not_run_is_said_once_not_raised() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # the auxiliary head is not used here

    model = inject(TwoHeads(), LoRAConfig(r=2, target_modules=["body", "aux"]))
    with pytest.warns(PEFTWarning, match=r"1 adapter\(s\) of TwoHeads did not run .*'aux'"):
        model(torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(torch.randn(2, 4))  # said once


def test_a_forward_that_raises_leaves_no_watch_hook_behind() -> None:
    model = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width
    assert not nn.modules.module._global_forward_pre_hooks
    model(torch.randn(2, 4))  # and the mode is still checked when it works

"""Per-sample adapters: each batch row, run in one batched pass, equals that row run alone with its adapter active
(the reference is the model itself, one row at a time, after ``set_adapter``): outputs and gradients, to 1e-5."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from torch import nn

from lightning_peft import (
    LoRAConfig,
    PrefixTuningConfig,
    active_adapter,
    adapter_parameters,
    add_adapter,
    inject,
    list_adapters,
    merge,
    per_sample_adapters,
    set_adapter,
)
from lightning_peft.adapter import adapters
from lightning_peft.named import adapter_parts

TOL = 1e-5


def _randomize(model: nn.Module, seed: int) -> None:
    """Random A and B for every named adapter (B starts at zero: rows would not differ)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in list_adapters(model):
            for param in adapter_parameters(model, name):
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


def _named(model: nn.Module, configs: dict[str, LoRAConfig]) -> nn.Module:
    model.double()  # adapters take the base weights' dtype; float64 keeps rounding far below the tolerance
    for name, config in configs.items():
        add_adapter(model, name, config)
    _randomize(model, 0)
    return model


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _gpt2(dropout: float = 0.0) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor], torch.Tensor]:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    targets = ["c_attn", "c_proj", "c_fc"]
    model = _named(transformers.GPT2LMHeadModel(config), {
        "a": LoRAConfig(r=2, alpha=4.0, dropout=dropout, target_modules=targets),
        "b": LoRAConfig(r=4, alpha=3.0, dropout=dropout, target_modules=targets),
        "c": LoRAConfig(r=8, alpha=8.0, dropout=dropout, target_modules=targets, rslora=True),
    })
    ids = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(1))
    return model, lambda m, x: m(x).logits, ids


def _mlp(dropout: float = 0.0) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = _named(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)), {
        "a": LoRAConfig(r=1, dropout=dropout, target_modules=["0", "2"]),
        "b": LoRAConfig(r=3, dropout=dropout, target_modules=["0", "2"]),
        "c": LoRAConfig(r=2, dropout=dropout, target_modules=["0", "2"]),
    })
    return model, lambda m, x: m(x), _randn(6, 3, 6)


def _embedding() -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = _named(nn.Sequential(nn.Embedding(20, 8, padding_idx=0), nn.Linear(8, 4)), {
        "a": LoRAConfig(r=2, target_modules=["0", "1"]),
        "b": LoRAConfig(r=5, target_modules=["0", "1"]),
        "c": LoRAConfig(r=3, target_modules=["0", "1"]),
    })
    set_adapter(model, None)
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0  # padding tokens: a value, no gradient
    return model, lambda m, x: m(x), ids


def _conv() -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                           nn.Conv2d(6, 4, 3, stride=2, dilation=2), nn.Flatten(), nn.LazyLinear(3))
    layers(torch.zeros(1, 3, 9, 9)).double()
    model = _named(layers, {
        "a": LoRAConfig(r=2, target_modules=["0", "2"]),
        "b": LoRAConfig(r=4, target_modules=["0", "2"]),
        "c": LoRAConfig(r=1, target_modules=["0", "2"]),
    })
    return model, lambda m, x: m(x), _randn(6, 3, 9, 9)


def _grouped_conv() -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)  # a grouped conv and a depthwise one; both grouped forms of LoRA among the adapters
    layers = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(),
                           nn.Conv2d(6, 6, 3, stride=2, groups=6, padding=1, padding_mode="reflect"), nn.Flatten())
    model = _named(layers, {
        "a": LoRAConfig(r=2, target_modules=["0", "2"]),
        "b": LoRAConfig(r=6, conv_groups="per_group", target_modules=["0", "2"]),
        "c": LoRAConfig(r=3, target_modules=["0", "2"]),
    })
    return model, lambda m, x: m(x), _randn(6, 4, 7, 7)


CASES = {"gpt2_conv1d": _gpt2, "linear": _mlp, "embedding": _embedding, "conv2d": _conv,
         "grouped_conv2d": _grouped_conv}
NAMES = ["a", None, "c", "b", "a", None]


def _grads(model: nn.Module) -> dict[str, list[torch.Tensor | None]]:
    return {n: [None if p.grad is None else p.grad.clone() for p in adapter_parameters(model, n)]
            for n in list_adapters(model)}


def _zero(model: nn.Module) -> None:
    for name in list_adapters(model):
        for param in adapter_parameters(model, name):
            param.grad = None


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_row_equals_the_row_run_alone_with_its_adapter(case: str, training: bool) -> None:
    model, run, x = CASES[case]()
    model.train(training)
    weights = torch.randn(len(NAMES), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alone, expected = [], None
    for i, name in enumerate(NAMES):
        set_adapter(model, name)
        out = run(model, x[i:i + 1])
        if out.requires_grad:  # None: the base model, frozen
            (out.sum() * weights[i]).backward()
        alone.append(out.detach())
    expected = _grads(model)
    _zero(model)
    set_adapter(model, "b")
    with per_sample_adapters(model, NAMES):
        out = run(model, x)
        assert active_adapter(model) == "b"
    (out.sum(dim=tuple(range(1, out.dim()))) * weights).sum().backward()
    torch.testing.assert_close(out.detach(), torch.cat(alone), atol=TOL, rtol=TOL)
    got = _grads(model)
    for name in list_adapters(model):
        for ours, theirs in zip(got[name], expected[name], strict=True):
            assert (ours is None) == (theirs is None), name
            if ours is not None:
                torch.testing.assert_close(ours, theirs, atol=TOL, rtol=TOL)
    assert all(g is not None for n in ("a", "b", "c") for g in got[n][:1])  # parked adapters got gradients too
    assert not any("row_delta" in vars(a) for _, a in adapters(model))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_float32_gpt2_rows_equal_rows_alone(training: bool) -> None:
    model, run, x = _gpt2()
    for name in list_adapters(model):
        for _, layer in adapter_parts(model, name)[0]:
            layer.float()
    model.float().train(training)
    alone = []
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            alone.append(run(set_adapter(model, name), x[i:i + 1]))
        with per_sample_adapters(model, NAMES):
            torch.testing.assert_close(run(model, x), torch.cat(alone), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case", ["linear", "grouped_conv2d"])  # stacked factors; each slot's whole update
def test_a_parameter_changed_in_place_changes_the_next_eval_batch(case: str) -> None:
    model, run, x = CASES[case]()
    with torch.no_grad():
        with per_sample_adapters(model, NAMES):
            before = run(model, x)
        adapter_parameters(model, "c")[1].mul_(2.0)  # kept stacks must not hide the change
        with per_sample_adapters(model, NAMES):
            after = run(model, x)
        expected = run(set_adapter(model, "c"), x[2:3])
    torch.testing.assert_close(after[2:3], expected, atol=TOL, rtol=TOL)
    assert not torch.equal(before[2], after[2]) and torch.equal(before[0], after[0])


@pytest.mark.parametrize("case", ["gpt2_conv1d", "linear"])
def test_gradients_reach_only_the_adapters_of_the_rows_in_the_loss(case: str) -> None:
    model, run, x = CASES[case]()
    model.train()
    with per_sample_adapters(model, NAMES):
        out = run(model, x)
    out[[1, 2, 5]].square().sum().backward()  # rows None, "c", None
    grads = _grads(model)
    assert all(g is not None and g.abs().sum() > 0 for g in grads["c"])
    for name in ("a", "b"):
        assert all(g is None or not g.any() for g in grads[name]), name


def test_all_rows_without_adapter_equal_the_base_model() -> None:
    model, run, x = _gpt2()
    set_adapter(model, None)
    base = run(model, x).detach()
    set_adapter(model, "a")
    with torch.no_grad(), per_sample_adapters(model, [None] * len(x)):
        torch.testing.assert_close(run(model, x), base, atol=TOL, rtol=TOL)
    assert active_adapter(model) == "a"


def test_dropout_applies_per_row_and_gradients_stay_on_each_rows_adapter() -> None:
    model, run, x = _gpt2(dropout=0.5)
    model.train()
    names = ["a", None, "c", "a", None, "c"]
    set_adapter(model, None)
    with torch.no_grad():
        base = run(model, x)
    set_adapter(model, "a")
    torch.manual_seed(3)
    with per_sample_adapters(model, names):
        out = run(model, x)
    update = (out - base).detach().flatten(1).abs().amax(dim=1)
    assert update[[0, 2, 3, 5]].min() > 1e-3 and update[[1, 4]].max() < TOL
    with torch.no_grad(), per_sample_adapters(model, names):  # a second draw: another mask
        again = run(model, x)
    assert (again - out).abs().amax() > 1e-3
    out.square().sum().backward()
    grads = _grads(model)
    assert all(g is not None and g.abs().sum() > 0 for n in ("a", "c") for g in grads[n])
    assert all(g is None for g in grads["b"])


def test_an_optimizer_over_every_adapter_trains_the_parked_ones() -> None:
    model, run, x = _mlp()
    params = [p for name in list_adapters(model) for p in adapter_parameters(model, name)]
    before = {n: [p.detach().clone() for p in adapter_parameters(model, n)] for n in list_adapters(model)}
    optimizer = torch.optim.SGD(params, lr=0.1)
    with per_sample_adapters(model, ["a", "b", "a", None, "a", "b"]):
        run(model, x).square().sum().backward()
    optimizer.step()
    for name, values in before.items():
        moved = any(not torch.equal(p, v) for p, v in zip(adapter_parameters(model, name), values, strict=True))
        assert moved == (name != "c"), name


def test_a_wrong_number_of_names_raises_before_any_layer_runs() -> None:
    model, run, x = _mlp()
    calls: list[int] = []
    model[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with per_sample_adapters(model, ["a", "b"]), pytest.raises(ValueError, match="2 names, one per batch row"):
        run(model, x)
    assert calls == []
    assert not any("row_delta" in vars(a) for _, a in adapters(model))


def test_an_unknown_name_or_a_string_raises_on_entry() -> None:
    model, _, _ = _mlp()
    with pytest.raises(KeyError, match=r"no adapter named 'zz'; the model has \['a', 'b', 'c'\]"):
        with per_sample_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(TypeError, match="not a string"):
        with per_sample_adapters(model, "a"):
            pass


def test_the_previous_adapter_comes_back_after_an_error() -> None:
    model, run, x = _mlp()
    set_adapter(model, None)
    with pytest.raises(RuntimeError, match="boom"), per_sample_adapters(model, ["b"] * 6):
        assert active_adapter(model) == "b"
        raise RuntimeError("boom")
    assert active_adapter(model) is None
    assert not any("row_delta" in vars(a) for _, a in adapters(model))


def test_adapters_of_other_methods_merged_or_on_other_layers_raise_with_the_reason() -> None:
    model, _, _ = _mlp()
    add_adapter(model, "few", LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="adapt different layers"), per_sample_adapters(model, ["a", "few"]):
        pass
    set_adapter(model, "a")
    merge(model)
    with pytest.raises(ValueError, match="merged"), per_sample_adapters(model, ["a", "b"]):
        pass
    gpt2, _, _ = _gpt2()
    add_adapter(gpt2, "prefix", PrefixTuningConfig(num_tokens=2))
    with pytest.raises(ValueError, match="holds prefix"), per_sample_adapters(gpt2, ["a", "prefix"]):
        pass


def test_dora_and_multihead_attention_raise_with_the_reason() -> None:
    model, _, _ = _mlp()
    add_adapter(model, "d", LoRAConfig(r=2, dora=True, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="'d' is DoRA .*per_sample_adapters does not compute"):
        with per_sample_adapters(model, ["a", "d"]):
            pass
    attention = inject(nn.Sequential(nn.MultiheadAttention(8, 2)), LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="LoRAMultiheadAttention has no per-row form"):
        with per_sample_adapters(attention, ["default"]):
            pass

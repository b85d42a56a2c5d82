"""Weighted merging of named LoRA adapters (lightning_peft.lora.weighted.add_weighted_adapter), checked against the
written-out sums ``Σ w_i · s_i B_i A_i`` per layer and against PEFT's ``add_weighted_adapter`` on the same weights."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_peft import (
    LoRAConfig,
    PromptTuningConfig,
    active_adapter,
    adapter_state_dict,
    adapters,
    add_adapter,
    add_weighted_adapter,
    list_adapters,
    set_adapter,
)

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-4)
LAYERS = ["emb", "conv", "lin"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.lin = nn.Linear(12, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (batch, seq, 12)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        return self.lin(h)


IDS = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(7))


def config(r: int, alpha: float, **kwargs: Any) -> LoRAConfig:
    return LoRAConfig(r=r, alpha=alpha, target_modules=list(LAYERS), **kwargs)


def with_adapters(ranks: dict[str, int], seed: int = 0, **kwargs: Any) -> nn.Module:
    """A Net with one named LoRA per entry of ``ranks`` (alpha 2r... varied), each with random A and B."""
    torch.manual_seed(0)
    model = Net().eval()
    for i, (name, r) in enumerate(ranks.items()):
        add_adapter(model, name, config(r, alpha=r + 1.0 + i, **kwargs))
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for tensor in adapter_state_dict(model).values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


def written_delta(adapter: Any) -> torch.Tensor:
    """``s · B A`` in the layer's weight layout, written out per layer type (not the code under test)."""
    a, b, s = adapter.lora_A.detach(), adapter.lora_B.detach(), adapter.scale
    base = adapter.base_layer
    if isinstance(base, nn.Embedding):
        return s * (b @ a).T  # weight (num, dim); A (r, num), B (dim, r)
    if isinstance(base, nn.Conv2d):
        return s * (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape)
    return s * b @ a


def deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    previous = active_adapter(model)
    set_adapter(model, name)
    found = {layer: written_delta(adapter) for layer, adapter in adapters(model)}
    set_adapter(model, previous)
    return found


def output_with_weights(model: nn.Module, added: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model run with ``W + added`` at each layer (adapters disabled): the merge written out."""
    previous = active_adapter(model)
    set_adapter(model, None)
    weights = {f"{layer}.weight": getattr(model, layer).weight + delta for layer, delta in added.items()}
    out = functional_call(model, weights, (IDS,))
    set_adapter(model, previous)
    return out


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -0.4], [-1.0, 0.0]], ids=["sum", "negative", "zero"])
def test_cat_is_exactly_the_weighted_sum_of_updates_for_embedding_conv_and_linear(weights: list[float]) -> None:
    model = with_adapters({"a": 2, "b": 3})
    sources = [deltas(model, "a"), deltas(model, "b")]
    add_weighted_adapter(model, ["a", "b"], weights, "mix", combination_type="cat")
    assert active_adapter(model) == "mix" and list_adapters(model) == ["a", "b", "mix"]
    expected = {layer: sum(w * d[layer] for w, d in zip(weights, sources)) for layer in LAYERS}
    merged = deltas(model, "mix")
    for layer in LAYERS:
        assert getattr(model, layer).r == 5  # the sum of the ranks
        torch.testing.assert_close(merged[layer], expected[layer], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), output_with_weights(model, expected), **TOL)


def test_svd_at_the_summed_rank_is_exact_and_lower_ranks_give_the_best_approximation() -> None:
    model = with_adapters({"a": 2, "b": 3})
    weights = [0.5, -1.5]
    sources = [deltas(model, "a"), deltas(model, "b")]
    expected = {layer: sum(w * d[layer] for w, d in zip(weights, sources)) for layer in LAYERS}
    add_weighted_adapter(model, ["a", "b"], weights, "exact", combination_type="svd", svd_rank=5)
    for layer, delta in deltas(model, "exact").items():
        torch.testing.assert_close(delta, expected[layer], **TOL)
    add_weighted_adapter(model, ["a", "b"], weights, "low", combination_type="svd")  # default: the largest rank, 3
    for layer, delta in deltas(model, "low").items():
        assert getattr(model, layer).r == 3
        target = expected[layer].flatten(1) if layer == "conv" else expected[layer]
        tail = torch.linalg.svdvals(target)[3:]  # Eckart–Young: the best rank-3 error is the tail's norm
        error = torch.linalg.matrix_norm(target - (delta.flatten(1) if layer == "conv" else delta))
        torch.testing.assert_close(error, tail.norm(), **TOL)


@pytest.mark.filterwarnings("ignore:LoRA trains more values")  # a 2 x 3 layer: any rank is large
def test_svd_rank_above_the_matrix_size_pads_with_zero_directions_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    generator = torch.Generator().manual_seed(0)
    expected = torch.zeros(2, 3)
    for name in ("a", "b"):
        add_adapter(model, name, LoRAConfig(r=2, target_modules=["0"]))
        with torch.no_grad():
            for t in adapter_state_dict(model).values():
                t.copy_(torch.randn(t.shape, generator=generator))
        expected += written_delta(model[0])
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=4)
    assert model[0].r == 4 and model[0].lora_A[2:].abs().max() == 0  # a 2 x 3 matrix has 2 directions
    torch.testing.assert_close(written_delta(model[0]), expected, **TOL)


def test_linear_combines_the_factors_with_signed_square_root_weights() -> None:
    model = with_adapters({"a": 2, "b": 2})
    weights = [0.6, -0.3]
    found: dict[str, list[Any]] = {}
    for name in ("a", "b"):
        set_adapter(model, name)
        found[name] = [(layer, a.lora_A.detach().clone(), a.lora_B.detach().clone(), a.scale)
                       for layer, a in adapters(model)]
    add_weighted_adapter(model, ["a", "b"], weights, "lin", combination_type="linear")
    merged = dict(adapters(model))
    for i, (layer, _, _, _) in enumerate(found["a"]):
        c = [w * found[n][i][3] for w, n in zip(weights, ("a", "b"))]
        a = sum((abs(ci) ** 0.5) * (1 if ci >= 0 else -1) * found[n][i][1] for ci, n in zip(c, ("a", "b")))
        b = sum((abs(ci) ** 0.5) * found[n][i][2] for ci, n in zip(c, ("a", "b")))
        torch.testing.assert_close(merged[layer].lora_A.detach(), a, **TOL)
        torch.testing.assert_close(merged[layer].lora_B.detach(), b, **TOL)
        assert merged[layer].scale == 1.0


def test_ties_and_magnitude_prune_match_a_written_out_reference_on_one_tensor() -> None:
    from lightning_peft.lora.combine import merge_tensors

    t1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    t2 = torch.tensor([-2.0, 2.0, 0.1, -1.0])
    # density 0.5 keeps the 2 largest |.| of each: t1 -> [3, 0, 0, -4], t2 -> [-2, 2, 0, 0]
    # elected signs ("total": sign of the sum of the pruned tensors): [+, +, +(tie), -]
    # disjoint mean of w·t over agreeing entries, w = [1, 2]: [3/1, 4/1, 0, -4/1]
    ties = merge_tensors([t1, t2], [1.0, 2.0], "ties", density=0.5)
    torch.testing.assert_close(ties, torch.tensor([3.0, 4.0, 0.0, -4.0]))
    pruned = merge_tensors([t1, t2], [1.0, 2.0], "magnitude_prune", density=0.5)
    torch.testing.assert_close(pruned, torch.tensor([3.0 - 4.0, 4.0, 0.0, -4.0]))
    frequency = merge_tensors([t1, -t1, t2], [1.0, 1.0, 1.0], "ties", density=1.0, sign_method="frequency")
    # signs per entry: [+,-,-], [-,+,+], [+,-,+], [-,+,-]: majorities -, +, +, - -> mean of the agreeing entries
    torch.testing.assert_close(frequency, torch.tensor([(-3.0 - 2.0) / 2, (1.0 + 2.0) / 2, (0.5 + 0.1) / 2,
                                                         (-4.0 - 1.0) / 2]))


def test_dare_is_reproducible_with_a_seed() -> None:
    model = with_adapters({"a": 2, "b": 2})
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "d1", combination_type="dare_linear", density=0.5, seed=3)
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "d2", combination_type="dare_linear", density=0.5, seed=3)
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "d3", combination_type="dare_linear", density=0.5, seed=4)
    d1, d2, d3 = (deltas(model, n) for n in ("d1", "d2", "d3"))
    for layer in LAYERS:
        torch.testing.assert_close(d1[layer], d2[layer], atol=0, rtol=0)
        assert not torch.allclose(d1[layer], d3[layer])


def peft_pair(ranks: dict[str, int], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Ours and PEFT's Net with the same named adapters and the same weights."""
    ours = with_adapters(ranks, seed)
    torch.manual_seed(0)
    theirs: Any = None
    for i, (name, r) in enumerate(ranks.items()):
        lora = peft.LoraConfig(r=r, lora_alpha=r + 1.0 + i, target_modules=list(LAYERS))
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(Net()), lora, adapter_name=name)
        else:
            theirs.add_adapter(name, lora)
        set_adapter(ours, name)
        theirs_params = dict(theirs.named_parameters())
        with torch.no_grad():
            for layer, adapter in adapters(ours):
                emb = layer == "emb"
                a_key = f"base_model.model.{layer}.lora_{'embedding_A' if emb else 'A'}.{name}{'' if emb else '.weight'}"
                theirs_params[a_key].copy_(adapter.lora_A)
                theirs_params[a_key.replace("A", "B")].copy_(adapter.lora_B)
    return ours, theirs


def peft_seeded_merges(seed: int) -> Any:
    """benchmarks/merging.py's context: PEFT's merge seeds torch's generator right before its first layer, so its
    DARE masks come from the stream ours draws from ``seed``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import merging
    finally:
        sys.path.pop(0)
    return merging.peft_seeded_merges(seed)


@pytest.mark.parametrize(("how", "kwargs"), [
    ("cat", {}), ("linear", {}), ("svd", {}), ("svd", dict(svd_rank=5)), ("ties", dict(density=0.5)),
    ("magnitude_prune", dict(density=0.6)), ("ties_svd", dict(density=0.5)),
    ("dare_linear", dict(density=0.5)), ("dare_ties", dict(density=0.7, majority_sign_method="frequency")),
])
def test_matches_peft_add_weighted_adapter_on_the_same_weights(how: str, kwargs: dict[str, Any]) -> None:
    equal_ranks = how not in ("cat", "svd") and not how.endswith("svd")
    ranks = {"u": 2, "v": 2} if equal_ranks else {"u": 2, "v": 3}  # PEFT warns about names inside "lora_"
    ours, theirs = peft_pair(ranks)
    weights = [0.8, -0.5]
    add_weighted_adapter(ours, ["u", "v"], weights, "mix", combination_type=how, seed=11, **kwargs)  # type: ignore[arg-type]
    with peft_seeded_merges(11) as seeded:
        theirs.add_weighted_adapter(["u", "v"], weights, "mix", combination_type=how, **kwargs)
    assert seeded == ([] if how == "cat" else [11])  # cat draws nothing and calls neither
    merged = deltas(ours, "mix")
    for layer in LAYERS:
        target = theirs.base_model.model.get_submodule(layer)
        torch.testing.assert_close(merged[layer], target.get_delta_weight("mix"), **TOL)
    theirs.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS), **TOL)


def test_grouped_conv_per_group_cat_and_svd_are_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, groups=2, padding=1))
    generator = torch.Generator().manual_seed(0)
    sums: list[torch.Tensor] = []
    for name, r in (("a", 2), ("b", 4)):
        add_adapter(model, name, LoRAConfig(r=r, target_modules=["0"], conv_groups="per_group"))
        with torch.no_grad():
            for t in adapter_state_dict(model).values():
                t.copy_(torch.randn(t.shape, generator=generator))
        layer = model[0]
        a = layer.lora_A.detach().reshape(2, r // 2, -1)
        b = layer.lora_B.detach().reshape(2, 6, r // 2)
        sums.append(torch.cat([layer.scale * b[g] @ a[g] for g in range(2)]).reshape(12, 4, 3, 3))  # per group
    expected = 2.0 * sums[0] - sums[1]
    for how, extra in (("cat", {}), ("svd", dict(svd_rank=6))):
        add_weighted_adapter(model, ["a", "b"], [2.0, -1.0], how, combination_type=how, **extra)  # type: ignore[arg-type]
        torch.testing.assert_close(model[0].delta_weight(), expected, **TOL)


def test_mha_in_and_out_projections_are_both_combined() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    generator = torch.Generator().manual_seed(0)
    expected_in, expected_out = 0, 0
    for name, r, w in (("a", 1, 0.5), ("b", 2, 2.0)):
        add_adapter(model, name, LoRAConfig(r=r, target_modules=["0"]))
        layer = model[0]
        with torch.no_grad():
            for t in adapter_state_dict(model).values():
                t.copy_(torch.randn(t.shape, generator=generator))
        expected_in = expected_in + w * layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
        expected_out = expected_out + w * layer.scale * layer.lora_out_B.detach() @ layer.lora_out_A.detach()
    add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix")
    torch.testing.assert_close(model[0].delta_weight(), expected_in, **TOL)
    torch.testing.assert_close(model[0].out_delta(), expected_out, **TOL)


def test_the_merged_adapter_switches_and_its_peft_export_computes_the_same(tmp_path: Any) -> None:
    from lightning_peft import save_adapter

    model = with_adapters({"a": 2, "b": 3})
    add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "mix")
    with torch.no_grad():
        mixed = model(IDS)
        set_adapter(model, "a")
        assert not torch.allclose(model(IDS), mixed)
        set_adapter(model, "mix")
        torch.testing.assert_close(model(IDS), mixed, atol=0, rtol=0)
    save_adapter(model, tmp_path, format="peft")
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(Net().eval(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS), mixed, **TOL)


def test_unknown_combination_type_names_the_choices() -> None:
    model = with_adapters({"a": 2, "b": 2})
    with pytest.raises(ValueError, match="combination_type='mean' is not one of 'cat', 'linear', 'svd', 'ties'"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", combination_type="mean")  # type: ignore[arg-type]


def test_unknown_adapter_names_list_the_existing_ones() -> None:
    model = with_adapters({"a": 2, "b": 2})
    with pytest.raises(KeyError, match=r"no adapter named 'c'; the model has \['a', 'b'\]"):
        add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], "m")


def test_adapters_of_different_targets_raise_with_the_layers() -> None:
    model = with_adapters({"a": 2})
    add_adapter(model, "b", LoRAConfig(r=2, target_modules=["lin"]))
    with pytest.raises(ValueError, match=r"adapt different layers \(only 'a': \['conv', 'emb'\], only 'b': \[\]\)"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m")


def test_adapters_of_another_method_raise_with_the_reason() -> None:
    model = with_adapters({"a": 2})
    add_adapter(model, "p", PromptTuningConfig(num_tokens=2, embedding="emb"))
    with pytest.raises(ValueError, match="adapter 'p' holds prompt tuning adapters; add_weighted_adapter takes LoRA adapters only"):
        add_weighted_adapter(model, ["a", "p"], [1.0, 1.0], "m")


def test_an_adapter_training_base_tensors_raises() -> None:
    model = with_adapters({"a": 2, "b": 2}, bias="lora_only")
    with pytest.raises(ValueError, match="adapter 'a' also trains base tensors"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m")


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(combination_type="linear"), r"needs equal ranks; got \[2, 3\]"),
    (dict(combination_type="ties"), r"needs density in \(0, 1\]"),
    (dict(combination_type="dare_ties", density=0.0), r"needs density in \(0, 1\]"),
    (dict(combination_type="cat", density=0.5), "density applies to ties"),
    (dict(combination_type="cat", svd_rank=2), "svd_rank applies to the svd"),
    (dict(weights=[1.0]), "got 2 adapters and 1 weights"),
    (dict(weights=[1.0, float("nan")]), "weights must be finite"),
    (dict(name="a"), "an adapter named 'a' exists already"),
])
def test_bad_arguments_raise_before_anything_is_added(kwargs: dict[str, Any], match: str) -> None:
    model = with_adapters({"a": 2, "b": 3})
    arguments: dict[str, Any] = dict(adapters=["a", "b"], weights=[1.0, 1.0], name="m") | kwargs
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, **arguments)
    assert list_adapters(model) == ["a", "b"] and active_adapter(model) == "b"

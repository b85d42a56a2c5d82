"""DoRA (``dora=True``): against HF PEFT's DoRA on the same weights (outputs and gradients), identity at init, exact
merge/unmerge, PEFT files both ways, what trains, dropout on the LoRA branch only, and a Lightning fit."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from glue_models import Task, dataset, family_lora
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_peft import LoRAConfig, add_adapter, inject, load_adapter, merge, save_adapter, set_adapter, unmerge
from lightning_peft.adapter import adapters
from lightning_peft.lora.dora import DoRALayer
from lightning_peft.lora.dropout import keep_mask

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


#: kind -> (base model factory, target modules, input factory); float inputs are leaves that require grad
CASES: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[], torch.Tensor]]] = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), ["0", "2"],
               lambda: torch.randn(5, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv1d(6, 4, 3, stride=2)),
               ["0", "2"], lambda: torch.randn(2, 3, 10)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, bias=False)),
               ["0", "2"], lambda: torch.randn(2, 3, 8, 8)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 3)), ["0", "2"],
               lambda: torch.randn(2, 2, 4, 5, 5)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 8), nn.Tanh(), nn.Linear(8, 3)), ["0", "2"],
                  lambda: torch.randint(0, 20, (3, 7))),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"], lambda: torch.randint(0, 50, (2, 9))),
}
PEFT_KINDS = list(CASES)


def _case(kind: str) -> tuple[nn.Module, list[str], torch.Tensor]:
    factory, targets, make_input = CASES[kind]
    torch.manual_seed(0)
    base = factory().eval()
    torch.manual_seed(1)
    return base, targets, make_input()


def _call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _dora(base: nn.Module, targets: list[str], **kwargs: object) -> nn.Module:
    return inject(copy.deepcopy(base), LoRAConfig(r=2, alpha=3.0, target_modules=targets, dora=True, **kwargs))


def _randomize(model: nn.Module, seed: int = 7) -> None:
    """Random A and B, and m moved off ‖W‖ (a scale per unit in [0.5, 1.5]), so every part shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapters(model):
            assert isinstance(layer, DoRALayer)
            for factor in (layer.lora_A, layer.lora_B):
                factor.copy_(torch.randn(factor.shape, generator=generator) * 0.3)
            layer.lora_magnitude.mul_(0.5 + torch.rand(layer.lora_magnitude.shape, generator=generator))


def _peft_twin(ours: nn.Module, base: nn.Module, targets: list[str]) -> nn.Module:
    """HF PEFT's DoRA on a copy of ``base`` holding our A, B and m, copied by hand into PEFT's own parameters."""
    config = peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=targets, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in adapters(ours):
            prefix = f"base_model.model.{name}."
            embedding = isinstance(layer.base_layer, nn.Embedding)
            a, b = (("lora_embedding_A.default", "lora_embedding_B.default") if embedding
                    else ("lora_A.default.weight", "lora_B.default.weight"))
            params[prefix + a].copy_(layer.lora_A)
            params[prefix + b].copy_(layer.lora_B)
            magnitude = params[prefix + "lora_magnitude_vector.default.weight"]
            magnitude.copy_(layer.lora_magnitude.reshape(magnitude.shape))
    return theirs


def _grads(
    model: nn.Module, x: torch.Tensor, key: Callable[[str], str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = _call(model, x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    return out.detach(), {key(n): p.grad.reshape(-1) for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_dora_outputs_and_gradients_equal_hf_peft_dora_on_the_same_weights(kind: str) -> None:
    base, targets, x = _case(kind)
    ours = _dora(base, targets).train()
    _randomize(ours)
    theirs = _peft_twin(ours, base, targets).train()

    def peft_name(name: str) -> str:  # base_model.model.0.lora_A.default.weight -> 0.lora_A
        name = name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
        return name.replace("lora_embedding_", "lora_").replace("lora_magnitude_vector", "lora_magnitude")

    got, our_grads = _grads(ours, x, lambda n: n)
    expected, their_grads = _grads(theirs, x, peft_name)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - _call(base, x)).abs().max() > 1e-2  # the adapter shows
    assert set(our_grads) == set(their_grads) and len(our_grads) == 3 * len(list(adapters(ours)))
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", PEFT_KINDS)
def test_dora_starts_equal_to_the_base_model_with_m_the_weight_norm(kind: str) -> None:
    base, targets, x = _case(kind)
    ours = _dora(base, targets, init="gaussian")
    with torch.no_grad():
        torch.testing.assert_close(_call(ours, x), _call(base, x), atol=1e-6, rtol=1e-6)
    for _, layer in adapters(ours):
        matrix = layer.weight_matrix(layer.base_weight)  # (out units, in)
        torch.testing.assert_close(layer.lora_magnitude, matrix.norm(dim=1))


MERGE_CASES = [*PEFT_KINDS, "grouped_shared", "grouped_per_group", "dilated_circular"]


def _merge_case(kind: str) -> tuple[nn.Module, list[str], torch.Tensor, dict[str, object]]:
    if kind.startswith("grouped"):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1)).eval()
        return base, ["0"], torch.randn(2, 4, 6, 6), {"conv_groups": kind.removeprefix("grouped_")}
    if kind == "dilated_circular":
        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(3, 5, 3, dilation=2, padding=2, padding_mode="circular")).eval()
        return base, ["0"], torch.randn(2, 3, 7, 7), {}
    return (*_case(kind), {})


@pytest.mark.parametrize("kind", MERGE_CASES)
def test_merged_dora_outputs_equal_unmerged_and_unmerge_restores_the_weights(kind: str) -> None:
    base, targets, x, extra = _merge_case(kind)
    ours = _dora(base, targets, **extra).eval()
    _randomize(ours)
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    with torch.no_grad():
        unmerged = _call(ours, x)
        merged = _call(merge(ours), x)
        torch.testing.assert_close(merged, unmerged, **TOL)
        assert (merged - _call(base, x)).abs().max() > 1e-2
        restored = _call(unmerge(ours), x)
    torch.testing.assert_close(restored, unmerged, **TOL)
    for name, layer in adapters(ours):
        own = f"{name}.weight".removeprefix(".")
        torch.testing.assert_close(layer.base_weight, originals[own], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding", "gpt2"])
def test_our_dora_file_loads_in_hf_peft_and_hf_peft_dora_loads_into_ours(kind: str, tmp_path: Path) -> None:
    base, targets, x = _case(kind)
    ours = _dora(base, targets).eval()
    _randomize(ours)
    save_adapter(ours, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_call(theirs, x), _call(ours, x), **TOL)

    made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=targets,
                                                                     use_dora=True)).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in made.named_parameters():
            if "lora_" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator)).add_(
                    torch.randn(param.shape, generator=generator) * 0.2 * ("magnitude" not in name))
    made.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    assert all(isinstance(layer, DoRALayer) for _, layer in adapters(loaded))
    with torch.no_grad():
        torch.testing.assert_close(_call(loaded, x), _call(made, x), **TOL)
        assert (_call(loaded, x) - _call(base, x)).abs().max() > 1e-2


def test_training_moves_only_a_b_and_the_magnitude() -> None:
    base, targets, x = _case("gpt2")
    ours = _dora(base, targets).train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n, _ in adapters(ours) for t in ("lora_A", "lora_B", "lora_magnitude")}
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        ours(x, labels=x).loss.backward()
        optimizer.step()
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


def test_dropout_reaches_the_lora_branch_only() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    layer = inject(nn.Sequential(copy.deepcopy(linear)), LoRAConfig(r=2, alpha=3.0, target_modules=["0"], dora=True,
                                                                     dropout=0.5))[0]
    _randomize(nn.Sequential(layer))
    x = torch.randn(5, 6)
    torch.manual_seed(3)
    got = layer.train()(x)
    torch.manual_seed(3)  # the mask LoRA's dropout draws (lightning_peft.lora.dropout): seed from the global generator
    mask = keep_mask(x, 0.5, int(torch.randint(0, 2**62, (), dtype=torch.int64).item()))
    with torch.no_grad():
        folded = linear.weight + layer.scale * layer.lora_B @ layer.lora_A
        g = layer.lora_magnitude / folded.norm(dim=1)
        lora = (x * mask / 0.5) @ layer.lora_A.T @ layer.lora_B.T
        expected = g * (x @ linear.weight.T + layer.scale * lora) + linear.bias
    torch.testing.assert_close(got, expected, **TOL)


def test_named_dora_adapters_switch_and_round_trip_in_the_native_format(tmp_path: Path) -> None:
    base, targets, x = _case("linear")
    model = _dora(base, targets)
    _randomize(model, seed=1)
    add_adapter(model, "other", LoRAConfig(r=2, alpha=3.0, target_modules=targets, dora=True))
    _randomize(model, seed=2)
    with torch.no_grad():
        other = _call(model, x)
        first = _call(set_adapter(model, "default"), x)
    assert (other - first).abs().max() > 1e-2
    save_adapter(model, tmp_path / "default")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "default")
    with torch.no_grad():
        torch.testing.assert_close(_call(loaded, x), first, **TOL)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"init": "pissa"}, "init='pissa'"),
    ({"target_parameters": ["0.weight"]}, "target_parameters"),
    ({"conv_path": "fused"}, "conv_path='fused'"),
])
def test_options_dora_does_not_take_are_refused_naming_them(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRAConfig(r=2, dora=True, **kwargs)  # type: ignore[arg-type]


def test_dora_on_multihead_attention_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="DoRA.*'0'.*LoRAMultiheadAttention"):
        inject(model, LoRAConfig(r=2, target_modules=["0"], dora=True))


def test_a_file_mixing_dora_and_lora_layers_is_refused_for_peft(tmp_path: Path) -> None:
    base, _, _ = _case("linear")
    model = inject(copy.deepcopy(base), LoRAConfig(r=2, target_modules=["0"], dora=True))
    inject(model, LoRAConfig(r=2, target_modules=["2"]))
    with pytest.raises(ValueError, match="use_dora"):
        save_adapter(model, tmp_path, format="peft")


def test_lightning_fit_with_the_dora_callback_lowers_the_loss_and_resumes_from_an_adapter_checkpoint(
    make_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> None:
    def loss(module: Task) -> float:
        ids = dataset("gpt2").tensors[0]
        with torch.no_grad():
            return float(module.backbone(input_ids=ids, labels=ids).loss)

    module = Task(family="gpt2", lr=3e-2)
    start = loss(module)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    make_trainer(callbacks=[family_lora("gpt2", dora=True), saver], enable_checkpointing=True,
                 max_epochs=3).fit(module)
    assert loss(module) < start - 0.1
    state = torch.load(saver.best_model_path, weights_only=False)["state_dict"]
    assert any(k.endswith(".lora_magnitude") for k in state) and not any(".base_layer." in k for k in state)

    resumed = Task(family="gpt2", lr=3e-2)
    make_trainer(callbacks=[family_lora("gpt2", dora=True)], max_epochs=3).fit(resumed, ckpt_path=saver.best_model_path)
    torch.testing.assert_close(loss(resumed), loss(module))


def test_weighted_merging_of_dora_adapters_is_refused_with_the_reason() -> None:
    from lightning_peft import add_weighted_adapter

    base, targets, _ = _case("linear")
    model = _dora(base, targets)
    add_adapter(model, "other", LoRAConfig(r=2, alpha=3.0, target_modules=targets, dora=True))
    with pytest.raises(ValueError, match="is DoRA"):
        add_weighted_adapter(model, ["default", "other"], [1.0, 1.0], "mix")


def test_base_weights_loaded_after_inject_are_caught_and_reset_dora_magnitude_fixes_it() -> None:
    # the meta-device flow: inject, materialize (strategies: to_empty, then reset_parameters), load the weights
    from lightning_peft import reset_dora_magnitude

    pretrained = _gpt2()
    with torch.device("meta"):
        model = _gpt2()
    inject(model, LoRAConfig(r=4, dora=True, target_modules=["c_attn", "c_fc"]))
    model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, DoRALayer):
            module.reset_parameters()  # m from the uninitialized memory
    model.load_state_dict(pretrained.state_dict(), strict=False)  # base weights only: the adapters' keys are missing
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match=r"DoRA's magnitude on this Conv1D was set from other weights .*"
                                         r"lightning_peft.reset_dora_magnitude\(model\) after loading"):
        model(ids)
    reset_dora_magnitude(model)
    with torch.no_grad():  # DoRA starts equal to the base model again
        torch.testing.assert_close(model(ids).logits, pretrained(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_magnitude_check_leaves_trained_and_loaded_magnitudes_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base, ids = _gpt2(), torch.randint(0, 50, (1, 4))
    for weights_too in (True, False):
        model = inject(copy.deepcopy(base), LoRAConfig(r=4, dora=True, target_modules=["c_attn"]))
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, DoRALayer):
                    module.lora_magnitude.mul_(1.5)  # as training or a loaded file leaves it
                    if weights_too:
                        module.base_layer.weight.mul_(2.0)  # and other base weights: m is the user's, no error
        model(ids)
    save_adapter(model, tmp_path / "adapter")
    load_adapter(copy.deepcopy(base), tmp_path / "adapter")(ids)  # the saved magnitude, loaded after inject

"""LoRA layers: identity at init, exact merge, parameter counts, gradients, init options, HF PEFT numerics.

Every layer kind runs through the same tests (``CASES``). Tolerances: outputs at init and with adapters switched
off agree to 1e-6 (the update is exactly zero, only summation order may differ), merged/unmerged/unloaded outputs
to 1e-5 (fp32, atol and rtol), PiSSA's SVD split to 1e-5.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lightning_peft.injection import inject
from lightning_peft.lora import LoRAConfig, LoRAConv, LoRALayer, LoRAMultiheadAttention
from lightning_peft.operations import adapters_disabled, merge, merge_and_unload, unmerge
from lightning_peft.tensors import adapter_tensors


class Attention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (LoRA adapts the whole module)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class GPT2Hidden(nn.Module):
    """A tiny GPT-2 from a config (its attention projections are transformers ``Conv1D``)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt = GPT2Model(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=ids).last_hidden_state


@dataclass
class Case:
    build: Callable[[], nn.Module]
    target: str  # the one module LoRA adapts
    r: int
    make_input: Callable[[], torch.Tensor]
    lora_params: Callable[[int], int]  # the closed-form adapter parameter count for rank r
    config: dict[str, object] = field(default_factory=dict)  # extra LoRAConfig fields


def _conv_count(cin: int, cout: int, kernel: tuple[int, ...], groups: int, per_group: bool = False
                ) -> Callable[[int], int]:
    b_columns = groups if per_group else 1  # B: out x r/g per group, or out x r shared by the groups
    return lambda r: r * cin // groups * math.prod(kernel) + cout * r // b_columns  # A: r x in/g x k


def _linear_count(fan_in: int, fan_out: int) -> Callable[[int], int]:
    return lambda r: r * (fan_in + fan_out)


CASES: dict[str, Case] = {
    "linear": Case(lambda: nn.Sequential(nn.Linear(6, 5)), "0", 2, lambda: torch.randn(3, 6), _linear_count(6, 5)),
    "conv1d": Case(lambda: nn.Sequential(nn.Conv1d(4, 6, 3, padding=1)), "0", 2, lambda: torch.randn(2, 4, 9),
                   _conv_count(4, 6, (3,), 1)),
    "conv2d_grouped": Case(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2)), "0", 4,
                           lambda: torch.randn(2, 4, 7, 7), _conv_count(4, 6, (3, 3), 2)),
    "conv2d_depthwise": Case(lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4)), "0", 4,
                             lambda: torch.randn(2, 4, 6, 6), _conv_count(4, 4, (3, 3), 4)),
    "conv2d_grouped_per_group": Case(lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2)), "0", 4,
                                     lambda: torch.randn(2, 4, 7, 7), _conv_count(4, 6, (3, 3), 2, per_group=True),
                                     {"conv_groups": "per_group"}),
    "conv2d_depthwise_per_group": Case(lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4)), "0", 4,
                                       lambda: torch.randn(2, 4, 6, 6), _conv_count(4, 4, (3, 3), 4, per_group=True),
                                       {"conv_groups": "per_group"}),
    "conv2d_depthwise_rank_below_groups": Case(lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8)), "0", 3,
                                               lambda: torch.randn(2, 8, 6, 6), _conv_count(8, 8, (3, 3), 8)),
    "conv1d_depthwise_dilated_circular": Case(
        lambda: nn.Sequential(nn.Conv1d(6, 6, 3, padding=2, dilation=2, groups=6, padding_mode="circular")), "0", 2,
        lambda: torch.randn(2, 6, 11), _conv_count(6, 6, (3,), 6)),
    "conv2d_dilated_strided": Case(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)), "0", 2,
                                   lambda: torch.randn(2, 3, 9, 9), _conv_count(3, 4, (3, 3), 1)),
    "conv2d_1x1": Case(lambda: nn.Sequential(nn.Conv2d(5, 6, 1)), "0", 3, lambda: torch.randn(2, 5, 4, 4),
                       _conv_count(5, 6, (1, 1), 1)),
    "conv2d_circular": Case(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")), "0", 2,
                            lambda: torch.randn(2, 3, 6, 6), _conv_count(3, 4, (3, 3), 1)),
    "conv2d_reflect_grouped": Case(
        lambda: nn.Sequential(nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, padding_mode="reflect", groups=2)),
        "0", 2, lambda: torch.randn(2, 4, 7, 6), _conv_count(4, 6, (3, 2), 2)),
    "conv3d": Case(lambda: nn.Sequential(nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1)), "0", 2,
                   lambda: torch.randn(2, 2, 6, 8, 8), _conv_count(2, 4, (3, 3, 3), 1)),  # enough positions to fuse
    "conv3d_grouped_dilated": Case(lambda: nn.Sequential(nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2)), "0", 2,
                                   lambda: torch.randn(1, 4, 5, 5, 5), _conv_count(4, 4, (3, 3, 3), 2)),
    "conv3d_grouped_dilated_per_group": Case(
        lambda: nn.Sequential(nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=2)), "0", 2,
        lambda: torch.randn(1, 4, 5, 5, 5), _conv_count(4, 4, (3, 3, 3), 2, per_group=True),
        {"conv_groups": "per_group"}),
    "conv3d_grouped_odd_rank": Case(lambda: nn.Sequential(nn.Conv3d(4, 6, 3, padding=1, groups=2)), "0", 3,
                                    lambda: torch.randn(1, 4, 5, 5, 5), _conv_count(4, 6, (3, 3, 3), 2)),
    "embedding": Case(lambda: nn.Sequential(nn.Embedding(12, 6, padding_idx=0)), "0", 3,
                      lambda: torch.randint(0, 12, (3, 5)), lambda r: r * (12 + 6)),
    "gpt2_conv1d": Case(GPT2Hidden, "gpt.h.0.attn.c_attn", 2, lambda: torch.randint(0, 40, (2, 6)),
                        _linear_count(16, 48)),
    "mha_batch_first": Case(lambda: Attention(batch_first=True), "attn", 2, lambda: torch.randn(2, 5, 8),
                            lambda r: r * (8 + 24) + r * (8 + 8)),  # in_proj (24 x 8) and out_proj (8 x 8)
    "mha_sequence_first": Case(lambda: Attention(batch_first=False), "attn", 2, lambda: torch.randn(5, 2, 8),
                               lambda r: r * (8 + 24) + r * (8 + 8)),
}
KINDS = list(CASES)


def _setup(kind: str, **config: object) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base model, adapted copy, input) for a case, with fixed seeds."""
    case = CASES[kind]
    torch.manual_seed(0)
    base = case.build().eval()
    adapted = inject(copy.deepcopy(base), LoRAConfig(**{"r": case.r, "alpha": 3.0, "target_modules": [case.target],
                                                        **case.config, **config}))
    return base, adapted, case.make_input()


def _randomize_adapters(model: nn.Module, std: float = 0.2) -> None:
    """Give every LoRA factor random values (B = 0 at init would hide errors in merge and gradients)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, tensor in adapter_tensors(model):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def _peft_modules(model: nn.Module) -> list[str]:
    return [f"{n} ({type(m).__module__})" for n, m in model.named_modules()
            if type(m).__module__.startswith("lightning_peft")]


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapted_model_equals_base_model_at_init(kind: str, init: str) -> None:
    base, adapted, x = _setup(kind, init=init)
    assert isinstance(adapted.get_submodule(CASES[kind].target), LoRALayer)
    torch.testing.assert_close(adapted(x), base(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_and_merge_and_unload_reproduce_adapter_outputs(kind: str) -> None:
    base, adapted, x = _setup(kind)
    _randomize_adapters(adapted)
    tol = dict(atol=1e-5, rtol=1e-5)
    expected = adapted(x)  # gradients on: the training path (fused for convs)
    if kind.startswith("conv"):  # the shared grouped form runs conv(x, W + s·ΔW) instead of the fused path
        fused = "FusedLoRAConv" in type(expected.grad_fn).__name__
        assert fused != adapted.get_submodule(CASES[kind].target).shared_over_groups, "the wrong conv path ran"
    convs = [m for m in adapted.modules() if isinstance(m, LoRAConv)]
    for conv in convs:
        conv.conv_path = "adapter"
    torch.testing.assert_close(adapted(x), expected, **tol)  # the plain three-operation path agrees
    for conv in convs:
        conv.conv_path = "auto"
    assert (expected - base(x)).abs().max() > 1e-2  # the update is not negligible

    merge(adapted)
    merged_out = adapted(x)
    torch.testing.assert_close(merged_out, expected, **tol)
    merge(adapted)  # merging twice is a no-op
    torch.testing.assert_close(adapted(x), merged_out, atol=0.0, rtol=0.0)

    unmerge(adapted)
    torch.testing.assert_close(adapted(x), expected, **tol)
    for name, tensor in base.state_dict().items():  # the base weights are back
        torch.testing.assert_close(adapted.state_dict()[name.replace(CASES[kind].target + ".",
                                                                     CASES[kind].target + ".base_layer.", 1)],
                                   tensor, atol=1e-6, rtol=1e-6)

    unloaded = merge_and_unload(adapted)
    assert _peft_modules(unloaded) == []
    assert type(unloaded.get_submodule(CASES[kind].target)) is type(base.get_submodule(CASES[kind].target))
    assert sorted(unloaded.state_dict()) == sorted(base.state_dict())
    torch.testing.assert_close(unloaded(x), expected, **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapters_gives_base_outputs(kind: str) -> None:
    base, adapted, x = _setup(kind)
    _randomize_adapters(adapted)
    with adapters_disabled(adapted):
        torch.testing.assert_close(adapted(x), base(x), atol=1e-6, rtol=1e-6)
    assert (adapted(x) - base(x)).abs().max() > 1e-2  # switched back on afterwards


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_parameter_count_equals_closed_form(kind: str, r: int) -> None:
    _, adapted, _ = _setup(kind, r=r)
    counted = sum(t.numel() for _, t in adapter_tensors(adapted))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert counted == trainable == CASES[kind].lora_params(r)


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_every_adapter_parameter_and_nothing_else(kind: str) -> None:
    base, adapted, x = _setup(kind)
    before = {n: t.clone() for n, t in adapted.state_dict().items()}
    _train(adapted, x)
    lora = {n for n, _ in adapter_tensors(adapted)}
    assert lora and all(n.split(".")[-1].startswith("lora_") for n in lora)
    changed = {n for n, t in adapted.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == lora


class Mixed(nn.Module):
    """Embedding -> Linear -> Conv1d -> head, to check which tensors train under each ``bias`` option."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.other = nn.Linear(8, 8)  # not adapted, not trainable
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids)).transpose(1, 2)
        return self.head(self.other(self.conv(h).transpose(1, 2).relu()))


@pytest.mark.parametrize(
    ("bias", "trained_biases"),
    [("none", set()), ("lora_only", {"lin.base_layer.bias", "conv.base_layer.bias"}),
     ("all", {"lin.base_layer.bias", "conv.base_layer.bias", "other.bias"})],
)
def test_only_adapters_trainable_modules_and_chosen_biases_change(bias: str, trained_biases: set[str]) -> None:
    torch.manual_seed(0)
    model = inject(Mixed(), LoRAConfig(r=2, target_modules=["emb", "lin", "conv"], trainable_modules=["head"],
                                       bias=bias))  # type: ignore[arg-type]
    before = {n: t.clone() for n, t in model.state_dict().items()}
    _train(model, torch.randint(0, 10, (4, 6)))
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    lora = {f"{layer}.lora_{f}" for layer in ("emb", "lin", "conv") for f in "AB"}
    assert changed == lora | {"head.weight", "head.bias"} | trained_biases
    assert set(dict(adapter_tensors(model))) == changed  # what trains is what an adapter checkpoint saves


@pytest.mark.parametrize("mode", ["frozen", "update", "update-then-frozen", "frozen-then-update"])
def test_batchnorm_statistics_frozen_or_updated_and_saved(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    modes = mode.split("-then-")  # with two methods, "update" wins in either order
    inject(model, *[LoRAConfig(r=2, target_modules=[t], batchnorm=m) for t, m in zip(["0", "3"], modes * 2)])  # type: ignore[arg-type]
    mode = "update" if "update" in modes else "frozen"
    stats = {n: t.clone() for n, t in model[1].named_buffers()}
    _train(model, torch.randn(4, 3, 6, 6) * 3 + 1)
    moved = {n for n, t in model[1].named_buffers() if not torch.equal(t, stats[n])}
    saved = {n for n, _ in adapter_tensors(model) if n.startswith("1.")}
    assert not model[1].weight.requires_grad and torch.equal(model[1].weight, torch.ones(4))
    if mode == "frozen":
        assert moved == set() and saved == set()
    else:
        assert moved == {"running_mean", "running_var", "num_batches_tracked"}
        assert saved == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


# --- HF PEFT on the same weights --------------------------------------------------------------------------------
PEFT_CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5)), lambda: torch.randn(3, 6), ("lora_A", "lora_B")),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1)), lambda: torch.randn(2, 3, 8, 8),
               ("lora_A", "lora_B")),
    "embedding": (lambda: nn.Sequential(nn.Embedding(12, 6)), lambda: torch.randint(0, 12, (3, 5)),
                  ("lora_embedding_A", "lora_embedding_B")),
}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", list(PEFT_CASES))
def test_lora_numerics_equal_hf_peft_on_same_weights(kind: str, rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    build, make_input, (peft_a, peft_b) = PEFT_CASES[kind]
    torch.manual_seed(0)
    base = build().eval()
    x = make_input()
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=6.0, target_modules=["0"], rslora=rslora))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"],
                                                                      use_rslora=rslora)).eval()
    _randomize_adapters(ours)
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        for mine, name in ((ours[0].lora_A, peft_a), (ours[0].lora_B, peft_b)):
            target = getattr(layer, name)["default"]
            (target.weight if isinstance(target, nn.Module) else target).copy_(mine.view_as(
                target.weight if isinstance(target, nn.Module) else target))
    assert ours[0].scale == pytest.approx(layer.scaling["default"]) == pytest.approx(
        6.0 / math.sqrt(4) if rslora else 6.0 / 4)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[0].delta_weight(), layer.get_delta_weight("default"), atol=1e-6, rtol=1e-6)


# --- init options -------------------------------------------------------------------------------------------------
def test_default_and_gaussian_init_distributions() -> None:
    layer = nn.Linear(256, 64)
    default = inject(nn.Sequential(copy.deepcopy(layer)), LoRAConfig(r=16, target_modules=["0"]))[0]
    gauss = inject(nn.Sequential(copy.deepcopy(layer)), LoRAConfig(r=16, target_modules=["0"], init="gaussian"))[0]
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on fan_in 256, as nn.Linear
    assert default.lora_A.abs().max() <= bound and default.lora_A.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                                                  rel=0.05)
    assert gauss.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05) and gauss.lora_A.abs().max() > bound
    assert not default.lora_B.any() and not gauss.lora_B.any()
    emb = inject(nn.Sequential(nn.Embedding(100, 64)), LoRAConfig(r=8, target_modules=["0"]))[0]
    assert not emb.lora_A.any() and emb.lora_B.std().item() == pytest.approx(1.0, rel=0.1)  # as HF PEFT


def test_init_is_deterministic_per_layer_name_and_seed() -> None:
    def lora_a(seed: int) -> torch.Tensor:
        return inject(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), LoRAConfig(r=2, seed=seed,
                                                                                   target_modules=["0", "1"]))
    first, again, other = lora_a(0), lora_a(0), lora_a(1)
    assert torch.equal(first[0].lora_A, again[0].lora_A) and torch.equal(first[1].lora_A, again[1].lora_A)
    assert not torch.equal(first[0].lora_A, first[1].lora_A) and not torch.equal(first[0].lora_A, other[0].lora_A)


PISSA_KINDS = ["linear", "conv1d", "conv2d_dilated_strided", "conv3d", "conv2d_grouped", "conv2d_depthwise",
               "embedding", "gpt2_conv1d", "mha_batch_first"]


@pytest.mark.parametrize("kind", PISSA_KINDS)
def test_pissa_keeps_outputs_and_puts_the_top_singular_part_in_the_adapter(kind: str) -> None:
    base, adapted, x = _setup(kind, init="pissa")
    torch.testing.assert_close(adapted(x), base(x), atol=1e-5, rtol=1e-5)
    layer = adapted.get_submodule(CASES[kind].target)
    original = base.get_submodule(CASES[kind].target)
    weight = original.in_proj_weight if kind.startswith("mha") else original.weight
    matrix = layer.weight_matrix(weight).detach().double().numpy()
    import numpy as np

    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    top = (u[:, : layer.r] * s[: layer.r]) @ vh[: layer.r]  # the best rank-r approximation, written out
    np.testing.assert_allclose(layer.delta_matrix().detach().double().numpy(), top, atol=1e-5)
    np.testing.assert_allclose(layer.weight_matrix(layer.base_weight).detach().double().numpy(), matrix - top,
                               atol=1e-5)  # W keeps the residual


def test_pissa_refuses_grouped_and_meta_layers_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"LoRA cannot adapt '0': init='pissa' needs an ungrouped layer.*groups=2"):
        inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), LoRAConfig(r=2, target_modules=["0"], init="pissa",
                                                                      conv_groups="per_group"))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="on the meta device. Inject after the pretrained weights are loaded"):
        inject(model, LoRAConfig(r=2, target_modules=["0"], init="pissa"))


# --- errors and meta-device construction -------------------------------------------------------------------------
def test_grouped_conv_rank_not_multiple_of_groups_names_layer_and_fix() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(ValueError, match=r"LoRA cannot adapt '0': LoRA rank r=3 is not a multiple of groups=2 .*"
                                         r"conv_groups='shared'.*rank_pattern=\{'0': 4\}.*exclude_modules"):
        inject(model, LoRAConfig(r=3, target_modules=["0"], conv_groups="per_group"))
    inject(model, LoRAConfig(r=3, target_modules=["0"], rank_pattern={"0": 4}, conv_groups="per_group"))  # a fix
    assert model[0].r == 4


@pytest.mark.parametrize(("field", "value", "message"), [
    ("r", 0, "LoRA r must be a positive integer; got 0"),
    ("rank_pattern", {"q": 1.5}, r"LoRA rank_pattern\['q'\] must be a positive integer"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("init", "olora", "init='olora' is not one of 'default', 'gaussian', 'pissa'"),
    ("bias", "some", "bias='some' is not one of"),
    ("batchnorm", "train", "batchnorm='train' is not one of"),
])
def test_invalid_config_values_raise_value_error(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{field: value})  # type: ignore[arg-type]


def _meta_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Conv1d(8, 8, 3, padding=1, groups=2), Attention(batch_first=True),
                         nn.Embedding(10, 8))


def _run_meta_model(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    h = model[3](ids) + model[0](torch.ones(*ids.shape, 6))
    return model[2](model[1](h.transpose(1, 2)).transpose(1, 2))


def test_meta_device_injection_materializes_to_identity_after_reset_parameters() -> None:
    config = LoRAConfig(r=2, target_modules=["0", "1", "2.attn", "3"])
    with torch.device("meta"):
        model = _meta_model()
    inject(model, config)
    assert all(t.is_meta for _, t in adapter_tensors(model))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():  # what strategies do: reset every module that owns tensors directly
        if any(True for _ in module.parameters(recurse=False)):
            reset = getattr(module, "reset_parameters", None) or module._reset_parameters  # (MultiheadAttention's)
            reset()
    assert not any(t.is_meta for t in model.parameters())
    ids = torch.randint(0, 10, (2, 5))
    with adapters_disabled(model):
        base_out = _run_meta_model(model, ids)
    torch.testing.assert_close(_run_meta_model(model, ids), base_out, atol=1e-6, rtol=1e-6)
    direct = inject(_meta_model(), config)  # built on CPU: the same per-name adapter initialisation
    for (name, tensor), (other, expected) in zip(adapter_tensors(model), adapter_tensors(direct), strict=True):
        assert name == other and torch.equal(tensor, expected), name


def test_dropout_acts_on_the_adapter_input_in_training_only() -> None:
    base, plain, x = _setup("conv2d_grouped")
    _, dropped, _ = _setup("conv2d_grouped", dropout=0.5)
    _randomize_adapters(plain)
    _randomize_adapters(dropped)  # the same values in both
    torch.testing.assert_close(dropped.eval()(x), plain(x), atol=1e-6, rtol=1e-6)
    dropped.train()
    assert (dropped(x) - plain(x)).abs().max() > 1e-3
    with adapters_disabled(dropped):  # the base layer never sees the dropout
        torch.testing.assert_close(dropped(x), base(x), atol=1e-6, rtol=1e-6)


def test_multihead_attention_warns_that_dropout_does_not_apply() -> None:
    from lightning_peft.errors import PEFTWarning

    with pytest.warns(PEFTWarning, match="LoRA dropout does not apply to nn.MultiheadAttention"):
        inject(Attention(batch_first=True), LoRAConfig(r=2, target_modules=["attn"], dropout=0.1))


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_prefix_compose_on_one_multihead_attention_in_either_order(lora_first: bool) -> None:
    from lightning_peft import PrefixTuningConfig, merge

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    lora, prefix = LoRAConfig(r=2, target_modules=["self_attn"]), PrefixTuningConfig(num_tokens=3)
    if lora_first:
        inject(model, lora, prefix)
    else:
        inject(model, prefix, LoRAConfig(r=2, target_modules=["self_attn.base_layer"]))
    attention = model.layers[0].self_attn
    assert isinstance(attention, LoRAMultiheadAttention)  # LoRA always wraps the prefix, which owns the forward
    with torch.no_grad():
        attention.lora_B.normal_()
        attention.lora_out_B.normal_()
    x = torch.randn(2, 5, 16)
    adapted = model(x)
    merge(model)  # the LoRA updates into the weights; the prefix keeps working on the merged attention
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    prefix_adapter = attention.base_layer
    prefix_adapter.enabled = False  # and the prefix was part of both outputs, not skipped in either
    assert (model(x) - adapted).abs().max() > 1e-3

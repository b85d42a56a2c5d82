"""LoRA's adapter-input dropout keeps no dropped copy of the input for backward (lightning_peft.lora.dropout).

Exactness is checked against the written-out ``W x + b + s · B A (m ⊙ x) / (1-p)`` in float64 with the very masks the
adapters drew (recorded by wrapping ``keep_mask``), saved bytes with ``saved_tensors_hooks``; no timing is asserted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_peft.lora.dropout as lora_dropout
from lightning_peft import LoRAConfig, inject
from lightning_peft.lora import LoRALayer

TOL = {"atol": 1e-6, "rtol": 1e-6}  # float64


@pytest.fixture
def masks(dropout_masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every keep-mask the adapters draw, forward and backward, in order (the conftest fixture)."""
    return dropout_masks


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.bias)
    return layer


def _base_formula(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ weight + bias if type(base).__name__ == "Conv1D" else x @ weight.T + bias


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_loss_and_every_gradient_equal_the_written_out_formula_in_float64(
    masks: list[torch.Tensor], kind: str, p: float
) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else _conv1d(12, 10)
    model = inject(nn.Sequential(base.double()), LoRAConfig(r=3, alpha=6.0, dropout=p, target_modules=["0"]))
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)

    def formula(rx: torch.Tensor, rw: torch.Tensor, rb: torch.Tensor, ra: torch.Tensor, rbb: torch.Tensor,
                layer: LoRALayer) -> torch.Tensor:
        return _base_formula(base, rw, rb, rx) + layer.scale * ((masks[0] * rx) / (1 - p)) @ ra.T @ rbb.T

    _assert_loss_and_every_gradient_equal(model, x, masks, formula)


def _assert_loss_and_every_gradient_equal(model: nn.Module, x: torch.Tensor, masks: list[torch.Tensor],
                                          formula: Callable[..., torch.Tensor]) -> None:
    """One training step of ``model[0]`` (B random, the base weight and bias trainable) against ``formula`` written
    out on copies of ``x, W, b, A, B`` with the mask the adapter drew: loss and every gradient, float64."""
    layer = model[0]
    assert isinstance(layer, LoRALayer)
    base = layer.base_layer
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide A's gradient
    base.weight.requires_grad_(True)
    base.bias.requires_grad_(True)  # every gradient, the base layer's included
    out = model.train()(x)
    weights = torch.randn_like(out)
    loss = (out * weights).sum()
    loss.backward()

    assert len(masks) == 2 and torch.equal(masks[0], masks[1])  # backward redrew the forward's mask
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, base.weight, base.bias, layer.lora_A, layer.lora_B)]
    expected_loss = (formula(*leaves, layer) * weights).sum()
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss, **TOL)
    for ours, theirs in zip((x, base.weight, base.bias, layer.lora_A, layer.lora_B), leaves, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL)


def test_the_saved_mask_form_used_under_compile_equals_the_formula_for_a_given_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 6) >= 0.3
    h = lora_dropout._DroppedInput.apply(x, a, 0.3, 0, mask, F.linear)
    weights = torch.randn(7, 2, dtype=torch.float64)
    (h * weights).sum().backward()
    rx, ra = x.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
    expected = ((mask * rx) / 0.7) @ ra.T
    (expected * weights).sum().backward()
    torch.testing.assert_close(h, expected, **TOL)
    torch.testing.assert_close(x.grad, rx.grad, **TOL)
    torch.testing.assert_close(a.grad, ra.grad, **TOL)


def _conv_delta_weight(layer: LoRALayer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B A`` of a conv adapter as a weight of the base's shape, written out per group (block-diagonal for
    ``per_group``, one matrix for ``shared``)."""
    base, r = layer.base_layer, layer.r
    blocks = base.groups if layer.conv_groups == "per_group" else 1
    a, b = a.reshape(blocks, r // blocks, -1), b.reshape(blocks, base.out_channels // blocks, r // blocks)
    return torch.cat([b[i] @ a[i] for i in range(blocks)]).reshape(base.weight.shape)


CONVS = {
    "2d-strided-dilated": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), {}),
    "1d-circular": (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"), {}),
    "3d": (lambda: nn.Conv3d(4, 6, 2), {}),
    "2d-grouped-per-group": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), {"conv_groups": "per_group"}),
    "2d-grouped-shared": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), {"conv_groups": "shared"}),
}


@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_dropout_loss_and_every_gradient_equal_the_written_out_formula_in_float64(
    masks: list[torch.Tensor], conv: str
) -> None:
    torch.manual_seed(0)
    build, options = CONVS[conv]
    base, p = build().double(), 0.3
    model = inject(nn.Sequential(base), LoRAConfig(r=4, alpha=8.0, dropout=p, target_modules=["0"], **options))
    x = torch.randn(2, base.in_channels, *([5] * (base.weight.dim() - 2)), dtype=torch.float64, requires_grad=True)

    def formula(rx: torch.Tensor, rw: torch.Tensor, rb: torch.Tensor, ra: torch.Tensor, rbb: torch.Tensor,
                layer: LoRALayer) -> torch.Tensor:
        dropped = masks[0] * rx / (1 - p)  # torch's own conv geometry below (padding mode included)
        return base._conv_forward(rx, rw, rb) + layer.scale * base._conv_forward(
            dropped, _conv_delta_weight(layer, ra, rbb), None)

    _assert_loss_and_every_gradient_equal(model, x, masks, formula)


def test_conv_adapters_save_only_the_shared_input_and_the_r_channel_product() -> None:
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)), LoRAConfig(r=4, dropout=0.1, target_modules=["0"]))
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    saved = _saved_storages(lambda: model.train()(x), model)
    assert model[0].path(x) == "adapter"  # active dropout: the adapter path (folded/fused have no adapter input)
    assert saved.pop(x.untyped_storage().data_ptr()) == x.numel() * 4  # the base conv's input, shared
    assert list(saved.values()) == [2 * 4 * 10 * 10 * 4]  # A x (r=4 channels) for B; no mask, no dropped copy


def _saved_storages(fn: Callable[[], torch.Tensor], model: nn.Module) -> dict[int, int]:
    """``{storage pointer: bytes}`` of what autograd saves while ``fn`` runs, the model's own tensors left out."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn().sum()
    loss.backward()  # outside the hooks: what a backward saves while it runs is freed within it
    return saved


class _QKV(nn.Module):
    """Three projections reading one input, as q, k and v of an attention layer."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_adapters_save_only_their_shared_input_and_the_r_channel_products(p: float) -> None:
    torch.manual_seed(0)
    model = inject(_QKV(), LoRAConfig(r=4, dropout=p, target_modules=["q", "k", "v"])).train()
    x = torch.randn(8, 32, requires_grad=True)
    saved = _saved_storages(lambda: model(x), model)
    assert saved.pop(x.untyped_storage().data_ptr()) == x.numel() * 4  # one storage for the three adapters
    assert sorted(saved.values()) == [8 * 4 * 4] * 3  # A x of each: (8 tokens, r=4) floats; no mask, no copy


def test_nn_dropout_before_a_as_hf_peft_runs_it_saves_a_copy_and_a_mask_per_adapter() -> None:
    # the reference point of the test above: what the plain composition keeps for one adapter
    x = torch.randn(8, 32, requires_grad=True)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    saved = _saved_storages(lambda: F.linear(F.linear(F.dropout(x, 0.1, training=True), a), b), nn.Module())
    # the scaled mask (float32 on CPU; CUDA's fused dropout keeps a bool one), the dropped copy, A, A's product and
    # B: the mask and the copy are what ours leaves out
    assert sorted(saved.values()) == sorted([8 * 32 * 4, 8 * 32 * 4, 4 * 32 * 4, 8 * 4 * 4, 16 * 4 * 4])


def test_embedding_adapters_keep_only_the_ids_and_the_r_channel_rows() -> None:
    model = inject(nn.Sequential(nn.Embedding(50, 16)), LoRAConfig(r=4, target_modules=["0"], dropout=0.1)).train()
    ids = torch.randint(0, 50, (3, 7))
    saved = _saved_storages(lambda: model(ids), model)
    assert sorted(saved.values()) == sorted([ids.numel() * 8, 3 * 7 * 4 * 4])  # ids (int64) and A's rows


def _one_layer(p: float) -> tuple[nn.Module, LoRALayer]:
    model = inject(nn.Sequential(nn.Linear(64, 64)), LoRAConfig(r=4, dropout=p, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_B.normal_()
    return model, model[0]


def test_dropout_acts_in_training_only_with_rate_p_and_a_fresh_mask_each_step(masks: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    model, _ = _one_layer(0.25)
    plain, _ = _one_layer(0.0)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4096, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x), rtol=0, atol=0)  # eval: no dropout, no mask drawn
        assert masks == []
        first, second = model.train()(x), model(x)
    assert not torch.equal(first, second) and not torch.equal(masks[0], masks[1])
    dropped = 1.0 - masks[0].double().mean().item()
    sigma = (0.25 * 0.75 / masks[0].numel()) ** 0.5
    assert abs(dropped - 0.25) < 5 * sigma  # each element dropped with probability p (5 sigma)


def _step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_the_same_seed_gives_the_same_masks_outputs_and_gradients() -> None:
    model, _ = _one_layer(0.5)
    x = torch.randn(32, 64)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(_step(model.train(), x))
    for first, second in zip(*runs, strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_bf16_autocast_matches_float32_with_the_same_masks(masks: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    model, layer = _one_layer(0.1)
    x = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = [layer.lora_A.grad, layer.lora_B.grad, x.grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    mask = masks[0]
    rx, ra, rb = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    base = layer.base_layer
    expected = F.linear(rx, base.weight, base.bias) + layer.scale * ((mask * rx) / 0.9) @ ra.T @ rb.T
    expected.square().sum().backward()
    for ours, theirs in zip([out.float(), *grads], (expected, ra.grad, rb.grad, rx.grad), strict=True):
        assert ours is not None and theirs is not None
        assert ((ours - theirs).norm() / theirs.norm()).item() < 2e-2  # bf16 rounding (eps 2^-8), relative in norm


class _Blocks(nn.Module):
    def __init__(self, checkpointed: bool, reentrant: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU()) for _ in range(3))
        self.checkpointed, self.reentrant = checkpointed, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant) if self.checkpointed else block(x)
        return x


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_masks_and_gradients(reentrant: bool) -> None:
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = inject(_Blocks(checkpointed, reentrant).double(), LoRAConfig(r=4, dropout=0.3, seed=1)).train()
        for layer in model.modules():
            if isinstance(layer, LoRALayer):
                with torch.no_grad():
                    layer.lora_B.normal_(generator=torch.Generator().manual_seed(2))
        x = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(4)
        grads.append([*_step(model, x), x.grad])
    assert len(grads[0]) == 7  # 3 x (A, B) and the input
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, **TOL)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32))


@pytest.fixture
def quiet_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("quiet_dynamo")
def test_compiled_training_step_with_dropout_has_no_graph_break_and_trains_every_adapter() -> None:
    model = inject(_tiny_gpt2(), LoRAConfig(r=4, dropout=0.1)).train()
    ids = torch.randint(0, 100, (2, 8))
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    compiled(input_ids=ids, labels=ids).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and bool(p.grad.isfinite().all()) for p in lora.values())
    assert all(bool(p.grad.ne(0).any()) for n, p in lora.items() if n.endswith("lora_B"))


@pytest.mark.usefixtures("quiet_dynamo")
def test_compiled_conv_adapters_with_dropout_have_no_graph_break_and_train() -> None:
    # under torch.compile a conv adapter drops through F.dropout (its redrawing backward calls autograd)
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)),
                   LoRAConfig(r=2, dropout=0.2, target_modules="all-conv")).train()
    x = torch.randn(2, 3, 9, 9)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.compile(model, backend="aot_eager")(x).square().sum().backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4 and all(p.grad is not None and bool(p.grad.isfinite().all()) for p in lora.values())

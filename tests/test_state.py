"""Adapter state: what it holds, save/load round trips, and the errors for the wrong model or file."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.adapter_files import load_adapter, save_adapter
from lightning_peft.errors import AdapterStateError, BaseModelMismatchError
from lightning_peft.injection import inject
from lightning_peft.lora import LoRAConfig
from lightning_peft.state import load_adapter_state_dict
from lightning_peft.tensors import adapter_state_dict, adapter_tensors


class Net(nn.Module):
    """Embedding, conv with BatchNorm, a linear layer and a head: every kind of saved tensor."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm1d(width)
        self.lin = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(self.lin(h.relu()))


def _config(**overrides: object) -> LoRAConfig:
    kwargs = dict(r=2, target_modules=["emb", "conv", "lin"], trainable_modules=["head"], batchnorm="update")
    return LoRAConfig(**{**kwargs, **overrides})  # type: ignore[arg-type]


def _base(width: int = 8) -> Net:
    torch.manual_seed(0)  # every call: the same "pretrained" base weights
    return Net(width)


def _trained(**overrides: object) -> nn.Module:
    model = inject(_base(), _config(**overrides))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randint(0, 10, (4, 6))).pow(2).mean().backward()
        optimizer.step()
    return model.eval()


IDS = torch.randint(0, 10, (3, 6), generator=torch.Generator().manual_seed(5))


def test_adapter_state_dict_holds_adapters_trainable_modules_and_updated_statistics_only() -> None:
    state = adapter_state_dict(_trained())
    assert sorted(state) == sorted([
        "emb.lora_A", "emb.lora_B", "conv.lora_A", "conv.lora_B", "lin.lora_A", "lin.lora_B",
        "head.weight", "head.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"])
    assert all(not t.requires_grad for t in state.values())


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_save_and_load_into_fresh_base_reproduces_outputs_exactly(tmp_path: Path, init: str) -> None:
    model = _trained(init=init)
    expected = model(IDS)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = load_adapter(_base(), tmp_path / "adapter")  # injects the saved configuration itself
    assert torch.equal(fresh.eval()(IDS), expected)
    for name, tensor in model.state_dict().items():  # PiSSA: the same residual base weights, bitwise
        assert torch.equal(fresh.state_dict()[name], tensor), name

    injected = load_adapter(inject(_base(), _config(init=init)), tmp_path / "adapter")  # or into an injected one
    assert torch.equal(injected.eval()(IDS), expected)


def test_files_are_safetensors_and_json_with_methods_and_base_fingerprint(tmp_path: Path) -> None:
    model = _trained()
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["format_version"] == 1
    assert meta["methods"] == [{"method": "lora", **{k: v for k, v in _config().to_dict().items() if k != "method"}}]
    assert meta["base_shapes"]["lin.weight"] == [8, 8] and meta["base_shapes"]["head.weight"] == [3, 8]
    assert not any("lora" in name or "base_layer" in name for name in meta["base_shapes"])
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == sorted(adapter_state_dict(model))


def test_load_adapter_state_dict_copies_into_an_injected_model() -> None:
    model = _trained()
    other = inject(_base(), _config())
    load_adapter_state_dict(other, adapter_state_dict(model))
    assert torch.equal(other.eval()(IDS), model(IDS))


def test_loading_into_another_base_model_names_what_differs(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    with pytest.raises(BaseModelMismatchError, match=r"was made for another base model: \d+ tensors differ in shape "
                                                     r"\(emb.weight: saved \[10, 8\], model \[10, 16\];"):
        load_adapter(_base(width=16), tmp_path)
    bigger = _base()
    bigger.extra = nn.Linear(8, 8)
    with pytest.raises(BaseModelMismatchError, match=r"2 model tensors were not in the saved base \(extra.weight, "
                                                     r"extra.bias\)"):
        load_adapter(bigger, tmp_path)
    smaller = _base()
    del smaller.head
    with pytest.raises(BaseModelMismatchError, match=r"2 base tensors of .* are not in the model \(head.weight, "
                                                     r"head.bias\)"):
        load_adapter(smaller, tmp_path)


def test_missing_and_extra_tensors_raise_adapter_state_error(tmp_path: Path) -> None:
    state = adapter_state_dict(_trained())
    partial = {k: v for k, v in state.items() if k != "lin.lora_B"}
    with pytest.raises(AdapterStateError, match=r"missing 1 adapter tensors \(lin.lora_B\)"):
        load_adapter_state_dict(inject(_base(), _config()), partial)
    with pytest.raises(AdapterStateError, match=r"other shapes \(emb.lora_A: saved \[2, 10\], model \[4, 10\]"):
        load_adapter_state_dict(inject(_base(), _config(r=4)), state)
    extra = {**state, "ghost.lora_A": torch.zeros(1)}
    with pytest.raises(AdapterStateError, match=r"holds 1 tensors this model does not adapt \(ghost.lora_A\)"):
        load_adapter_state_dict(inject(_base(), _config()), extra)
    loaded = load_adapter_state_dict(inject(_base(), _config()), extra, strict=False)  # strict=False skips them
    assert all(torch.equal(t, state[n]) for n, t in adapter_state_dict(loaded).items())  # and loads the rest

    save_adapter(_trained(), tmp_path)
    save_file({k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterStateError, match=r"missing 1 adapter tensors \(lin.lora_B\)"):
        load_adapter(_base(), tmp_path)


def test_a_module_inside_the_injected_root_saves_an_adapter_that_loads_into_it_alone(tmp_path: Path) -> None:
    # as a LightningModule holds its model: rules written from the root, a trainable layer outside the saved module
    root = nn.ModuleDict({"net": _base(), "extra": nn.Linear(3, 3)})
    inject(root, _config(target_modules=["net.emb", "conv", "net.lin"], trainable_modules=["net.head", "extra"]))
    with torch.no_grad():
        for tensor in adapter_state_dict(root).values():
            if tensor.is_floating_point():
                tensor.add_(0.1)  # away from the identity start
    expected = root["net"].eval()(IDS)
    save_adapter(root["net"], tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["methods"]
    assert [(m["target_modules"], m["trainable_modules"]) for m in saved] == [(["emb", "conv", "lin"], ["head"])]
    assert not any(name.startswith(("net.", "extra.")) for name in load_file(str(tmp_path / "adapter_model.safetensors")))
    torch.testing.assert_close(load_adapter(_base(), tmp_path).eval()(IDS), expected, rtol=0, atol=0)
    other = inject(nn.ModuleDict({"net": _base(), "extra": nn.Linear(3, 3)}), _config(trainable_modules=["extra"]))
    save_adapter(other["net"], tmp_path / "only-outside")  # no trainable module inside: the rule is left out
    saved = json.loads((tmp_path / "only-outside" / "adapter_config.json").read_text())["methods"]
    assert saved[0]["trainable_modules"] is None
    load_adapter(_base(), tmp_path / "only-outside")
    with pytest.raises(ValueError, match="not the adapter itself"):
        save_adapter(root["net"].emb, tmp_path / "emb")


class _Task(nn.Module):
    """A LightningModule's shape without Lightning: the base model at ``model``, methods injected into the root."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.score = nn.Linear(32, 2)  # outside the saved model: its trainable rule has nothing to select there


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)  # the same "pretrained" base every call
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_sub_module_save_with_suffix_rules_loads_exactly_into_a_fresh_transformers_model(tmp_path: Path) -> None:
    # issue 13: trainable_modules=["ln_f"] was dropped from the sub-module's config, so the load refused ln_f's tensors
    task = inject(_Task(_tiny_gpt2()), LoRAConfig(r=2, target_modules=["c_attn", "c_proj"],
                                                  trainable_modules=["ln_f", "score"]))
    with torch.no_grad():
        for tensor in adapter_state_dict(task).values():
            tensor.add_(0.05)  # away from the identity start, ln_f included
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = task.model(ids).logits
    save_adapter(task.model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["methods"]
    assert [(m["target_modules"], m["trainable_modules"]) for m in saved] == [(["c_attn", "c_proj"], ["ln_f"])]
    fresh = load_adapter(_tiny_gpt2(), tmp_path)
    assert torch.equal(fresh(ids).logits, expected)
    assert adapter_state_dict(fresh).keys() == adapter_state_dict(task.model).keys()
    assert torch.equal(fresh.transformer.ln_f.weight, task.model.transformer.ln_f.weight)


def test_a_sub_module_save_keeps_full_name_rules_selecting_exactly_what_they_selected(tmp_path: Path) -> None:
    # "net.lin" selects net.lin only; written as "lin" it would also select net.block.lin in the saved module
    def base() -> nn.ModuleDict:
        torch.manual_seed(0)
        return nn.ModuleDict({"lin": nn.Linear(4, 4), "block": nn.ModuleDict({"lin": nn.Linear(4, 4)})})

    root = inject(nn.ModuleDict({"net": base()}), LoRAConfig(r=2, target_modules=["net.lin"],
                                                            rank_pattern={"net.lin": 1}))
    with torch.no_grad():
        for tensor in adapter_state_dict(root).values():
            tensor.add_(0.1)
    save_adapter(root["net"], tmp_path)
    fresh = load_adapter(base(), tmp_path)
    expected = {name: tensor for name, tensor in adapter_state_dict(root["net"]).items()}
    assert sorted(adapter_state_dict(fresh)) == sorted(expected) == ["lin.lora_A", "lin.lora_B"]
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fresh["lin"](x), root["net"]["lin"](x)) and fresh["lin"].lora_A.shape[0] == 1
    assert torch.equal(fresh["block"]["lin"](x), root["net"]["block"]["lin"](x))


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(AdapterStateError, match="uses adapter format 99; this lightning_peft reads up to 1"):
        load_adapter(_base(), tmp_path)


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "code ran"))  # type: ignore[return-value]


def test_loading_executes_no_code_from_the_files(tmp_path: Path) -> None:
    save_adapter(_trained(), tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "adapter_model.safetensors").write_bytes(pickle.dumps({"lin.lora_A": _Payload(marker)}))
    with pytest.raises(Exception) as info:
        load_adapter(_base(), tmp_path)
    assert not marker.exists() and "pickle" not in type(info.value).__module__
    with pytest.raises(Exception):
        load_file(str(tmp_path / "adapter_model.safetensors"))  # it is not safetensors; nothing unpickles it
    assert not marker.exists()


def test_batchnorm_statistics_round_trip_with_update_mode(tmp_path: Path) -> None:
    model = _trained()
    assert model.norm.num_batches_tracked.item() == 3
    save_adapter(model, tmp_path)
    fresh = load_adapter(_base(), tmp_path)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fresh.norm, name), getattr(model.norm, name))
    assert {n for n, _ in adapter_tensors(fresh)} == set(adapter_state_dict(model))


def test_plain_base_state_dict_loads_into_the_wrapped_layers_of_an_adapted_model() -> None:
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    saved = {name: tensor + 1.0 for name, tensor in plain.state_dict().items()}
    model = inject(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoRAConfig(r=2, target_modules=["0"]))
    result = model.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["0.lora_A", "0.lora_B"]
    assert torch.equal(model[0].base_layer.weight, saved["0.weight"]) and torch.equal(model[1].bias, saved["1.bias"])

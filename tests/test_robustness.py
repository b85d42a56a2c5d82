"""Nothing lost, nothing silent: atomic saves, all-or-nothing loads, refused bad values and files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft
import lightning_peft.adapter_files.disk
from lightning_peft import LoRA, LoRAConfig, PrefixTuningConfig, PromptTuningConfig, inject, load_adapter, save_adapter
from lightning_peft.errors import AdapterStateError, TargetNotFoundError
from lightning_peft.operations import merge, unload, unmerge
from lightning_peft.tensors import adapter_state_dict

pytest.importorskip("transformers")
from strategy_models import tiny_gpt2  # noqa: E402

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: LoRAConfig(r=2, target_modules=["c_attn", "c_fc"]),
    "prefix": lambda: PrefixTuningConfig(num_tokens=3),
    "prompt": lambda: PromptTuningConfig(num_tokens=3, kind="tokens"),
}


def adapted(method: str, shift: float = 0.5) -> nn.Module:
    """A tiny GPT-2 with ``method`` injected and its adapter tensors moved away from their init by ``shift``."""
    model = inject(tiny_gpt2(), METHODS[method]()).eval()
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.add_(shift)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- atomic saves ---------------------------------------------------------------------------------------------
def _fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int) -> None:
    """Make ``owner.name`` raise OSError on its ``call``-th call (1-based); earlier calls run as usual."""
    original, calls = getattr(owner, name), []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


FAILURES = {  # where a save can break: the tensor file, the JSON, renaming the tensors, renaming the config
    "tensor file": (lightning_peft.adapter_files.disk, "save_file", 1),
    "config write": (Path, "write_text", 1),
    "tensor rename": (os, "replace", 1),
    "config rename": (os, "replace", 2),
    "fsync": (os, "fsync", 2),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("format", ["native", "peft"])
def test_a_failed_save_leaves_the_previous_adapter_unchanged_and_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, format: str, failure: str
) -> None:
    old = adapted("lora", shift=0.5)
    save_adapter(old, tmp_path, format=format)  # type: ignore[arg-type]
    before = files_of(tmp_path)
    owner, name, call = FAILURES[failure]
    _fail_on_call(monkeypatch, owner, name, call)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(adapted("lora", shift=-0.25), tmp_path, format=format)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert files_of(tmp_path) == before  # bitwise the old pair, and nothing else in the folder
    assert torch.equal(logits(load_adapter(tiny_gpt2().eval(), tmp_path)), logits(old))


def test_a_failed_first_save_leaves_no_adapter_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_call(monkeypatch, os, "replace", 2)
    with pytest.raises(OSError):
        save_adapter(adapted("lora"), tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


def test_a_save_over_an_adapter_replaces_both_files(tmp_path: Path) -> None:
    save_adapter(adapted("prefix", shift=0.5), tmp_path)
    new = adapted("lora", shift=-0.25)
    save_adapter(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(logits(load_adapter(tiny_gpt2().eval(), tmp_path)), logits(new))


_KILLED_SAVE = """
import os, sys, torch
from torch import nn
from lightning_peft import LoRAConfig, inject, save_adapter
model = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
with torch.no_grad():
    model[0].lora_B.fill_(0.5)  # the same shapes as the saved adapter, other values
replace, calls = os.replace, []
def killed(*args):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)  # killed between the tensor rename and the config rename: no cleanup runs
    replace(*args)
os.replace = killed
save_adapter(model, sys.argv[1])
"""


def test_a_save_killed_between_the_two_renames_is_refused_on_load_naming_both_files(tmp_path: Path) -> None:
    old = inject(nn.Sequential(nn.Linear(4, 4)), LoRAConfig(r=2, target_modules=["0"]))
    save_adapter(old, tmp_path)
    root = Path(lightning_peft.__file__).parents[1]
    result = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert result.returncode == 9, result.stderr[-2000:]
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["0.lora_B"].eq(0.5).all()  # new tensors, old config
    with pytest.raises(AdapterStateError, match=r"adapter_model\.safetensors \(save \w+\) and .*adapter_config\.json "
                       r"\(save \w+\) come from different saves.*Save the adapter again"):
        load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "save_id"}))
    with pytest.raises(AdapterStateError, match=r"\(save None\) come from different saves"):  # a config without an id
        load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    save_adapter(old, tmp_path)  # the fix the message gives
    assert torch.equal(load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)[0].lora_B, old[0].lora_B)


def test_saving_a_model_without_adapters_is_refused(tmp_path: Path) -> None:
    for format in ("native", "peft"):
        with pytest.raises(ValueError, match="holds no adapter to save; inject a method first"):
            save_adapter(nn.Linear(2, 2), tmp_path, format=format)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --- all-or-nothing loads -------------------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "attributes": [(n, sorted(k for k in vars(m) if k.startswith("_peft"))) for n, m in model.named_modules()],
        "logits": logits(model),
    }


def assert_same(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    for key in ("types", "grad", "hooks", "attributes"):
        assert after[key] == before[key], key
    assert torch.equal(after["logits"], before["logits"])


def _edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _first(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


BREAKAGES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "shape": (lambda d: _edit_tensors(d, lambda t: t.update({_first(t): torch.zeros(1, 1)})),
              AdapterStateError, "other shapes"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop(_first(t))), AdapterStateError, "missing 1"),
    "nan": (lambda d: _edit_tensors(d, lambda t: t[_first(t)].view(-1)[0].fill_(float("nan"))),
            AdapterStateError, "NaN or infinite values"),
    "integers": (lambda d: _edit_tensors(d, lambda t: t.update({_first(t): t[_first(t)].long()})),
                 AdapterStateError, "integer tensors where the model has floating-point"),
    "truncated tensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]), AdapterStateError, "not a readable safetensors"),
    "invalid json": (lambda d: (d / "adapter_config.json").write_text('{"format_version": 1, "meth'),
                     AdapterStateError, "is not valid JSON"),
    "absent target": (lambda d: _add_method(d, {"method": "lora", "r": 2, "target_modules": ["ghost"]}),
                      TargetNotFoundError, "ghost"),
}


def _add_method(directory: Path, method: dict[str, Any]) -> None:
    path = directory / "adapter_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "methods": [*meta["methods"], method]}))


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_failed_load_leaves_the_model_exactly_as_before(tmp_path: Path, method: str, breakage: str) -> None:
    save_adapter(adapted(method), tmp_path)
    corrupt, error, message = BREAKAGES[breakage]
    corrupt(tmp_path)
    models = [tiny_gpt2().eval(), inject(tiny_gpt2(), METHODS[method]()).eval()]  # bare and injected
    for model in models[:1] if breakage == "absent target" else models:  # an injected model reads no methods
        before = fingerprint(model)
        with pytest.raises(error, match=message) as info:
            load_adapter(model, tmp_path)
        if breakage in ("truncated tensors", "invalid json"):
            assert str(tmp_path) in str(info.value)  # the message names the file
        assert_same(fingerprint(model), before)


@pytest.mark.parametrize("saved", ["peft format", "pissa"])
def test_a_failed_load_of_a_wrong_shape_leaves_the_model_as_before(saved: str, tmp_path: Path) -> None:
    # the PEFT reader has its own inject path; PiSSA rewrites the base weights when injected, before the tensors'
    # shapes can be checked: both must give the model back bitwise
    if saved == "pissa":
        save_adapter(inject(tiny_gpt2(), LoRAConfig(r=2, init="pissa", target_modules=["c_attn"])), tmp_path)
    else:
        save_adapter(adapted("lora"), tmp_path, format="peft")
    _edit_tensors(tmp_path, lambda t: t.update({_first(t): torch.zeros(1, 1)}))
    model = tiny_gpt2().eval()
    before = fingerprint(model)
    with pytest.raises(AdapterStateError, match="other shapes"):
        load_adapter(model, tmp_path)
    assert_same(fingerprint(model), before)


def test_loading_into_a_merged_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    save_adapter(adapted("lora", shift=-0.25), tmp_path)
    model = merge(adapted("lora", shift=0.5))
    before = fingerprint(model)
    with pytest.raises(AdapterStateError, match=r"are merged into the base weights .*Call unmerge\(model\) first"):
        load_adapter(model, tmp_path)
    assert_same(fingerprint(model), before)
    loaded = load_adapter(unmerge(model), tmp_path)  # the fix works, and unload gives the base back
    torch.testing.assert_close(logits(loaded), logits(load_adapter(tiny_gpt2().eval(), tmp_path)), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(unload(loaded)), logits(tiny_gpt2().eval()), rtol=0, atol=1e-5)


def test_a_pickle_only_folder_is_refused_on_purpose_with_how_to_convert(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(FileNotFoundError, match=r"adapter_model.bin but no adapter_model.safetensors: lightning_peft "
                                                r"refuses pickle files on purpose.*save_file\(torch.load"):
        load_adapter(tiny_gpt2(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist; there is no folder"):
        load_adapter(tiny_gpt2(), tmp_path / "absent")


# --- Lightning resume -----------------------------------------------------------------------------------------
class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)),
                          batch_size=4)


def test_resuming_a_checkpoint_saved_without_adapters_is_refused_with_the_fix(
    tmp_path: Path, make_trainer: Callable[..., L.Trainer]
) -> None:
    plain = make_trainer()
    plain.fit(Regression())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    module = Regression()
    with pytest.raises(AdapterStateError, match=r"saved without lightning_peft adapters.*fit\(\) without ckpt_path"):
        make_trainer(max_epochs=2, callbacks=[LoRA(r=2, target_modules=["net.0"])]).fit(
            module, ckpt_path=tmp_path / "plain.ckpt")
    saved = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    module = Regression()  # the documented start from those base weights, with a fresh optimizer
    module.load_state_dict(saved, strict=False)
    trainer = make_trainer(callbacks=[LoRA(r=2, target_modules=["net.0"])])
    trainer.fit(module)
    assert torch.equal(module.net[2].weight, saved["net.2.weight"]) and trainer.global_step == 2


def test_resuming_with_another_lora_rank_names_the_rank(tmp_path: Path, make_trainer: Callable[..., L.Trainer]) -> None:
    first = make_trainer(callbacks=[LoRA(r=2, target_modules=["net.0"])])
    first.fit(Regression())
    first.save_checkpoint(tmp_path / "r2.ckpt")
    with pytest.raises(AdapterStateError, match=r"saved with lora r=2 \(the model has r=3\).*saved \[2, 4\], model "
                                                r"\[3, 4\]"):
        make_trainer(max_epochs=2, callbacks=[LoRA(r=3, target_modules=["net.0"])]).fit(
            Regression(), ckpt_path=tmp_path / "r2.ckpt")


# --- values that would make training silently do nothing --------------------------------------------------------
@pytest.mark.parametrize(("make", "message"), [
    (lambda: LoRAConfig(alpha=0), r"LoRA alpha must be a positive finite number .*got 0"),
    (lambda: LoRAConfig(alpha=-4.0), r"LoRA alpha must be a positive finite number"),
    (lambda: LoRAConfig(alpha=float("nan")), r"LoRA alpha must be a positive finite number"),
    (lambda: LoRAConfig(alpha_pattern={"q": 0.0}), r"LoRA alpha_pattern\['q'\] must be a positive finite"),
    (lambda: LoRAConfig(r=0), r"LoRA r must be a positive integer; got 0"),
    (lambda: LoRAConfig(rank_pattern={"q": -1}), r"LoRA rank_pattern\['q'\] must be a positive integer"),
    (lambda: LoRAConfig(dropout=1.0), r"LoRA dropout must be in \[0, 1\); got 1.0"),
    (lambda: LoRAConfig(dropout=-0.1), r"LoRA dropout must be in \[0, 1\)"),
    (lambda: LoRAConfig(layers=[]), r"LoRA layers must be a non-empty list of layer indices >= 0"),
    (lambda: LoRAConfig(layers=[-1]), r"LoRA layers must be a non-empty list"),
    (lambda: PrefixTuningConfig(num_tokens=0), r"num_tokens must be a positive integer"),
    (lambda: PrefixTuningConfig(init_std=float("inf")), r"init_std must be a finite number >= 0"),
    (lambda: PrefixTuningConfig(gate=True, init_std=0.0), r"gate=True, init_std=0\) never learns"),
    (lambda: PrefixTuningConfig(layers=[]), r"prefix tuning layers must be a non-empty list"),
    (lambda: PromptTuningConfig(num_tokens=0), r"num_tokens must be a positive integer"),
    (lambda: PromptTuningConfig(width=0), r"width must be a positive integer"),
    (lambda: PromptTuningConfig(image_size=0), r"image_size must be a positive int or \[height, width\]"),
    (lambda: PromptTuningConfig(image_size=[32, -1]), r"image_size must be a positive int"),
])
def test_values_that_silently_do_nothing_are_refused_at_construction(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_an_unknown_field_in_a_peft_config_is_refused(tmp_path: Path) -> None:
    save_adapter(adapted("lora"), tmp_path, format="peft")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "lora_scaling_mode": "new"}))
    model = tiny_gpt2().eval()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"adapter_config.json has fields PEFT 0.21.2's LORA config does not know "
                                         r"\(\['lora_scaling_mode'\]\)"):
        load_adapter(model, tmp_path)
    assert_same(fingerprint(model), before)


# --- clear errors ---------------------------------------------------------------------------------------------
def test_pissa_with_r_above_the_layer_names_r_layer_and_limit() -> None:
    with pytest.raises(ValueError, match=r"LoRA cannot adapt 'lin': init='pissa' with r=8 needs r <= 3, the smaller "
                                         r"side of this Linear's \(3, 5\) weight matrix.*rank_pattern=\{'lin': 3\}"):
        inject(nn.ModuleDict({"lin": nn.Linear(5, 3)}), LoRAConfig(r=8, init="pissa", target_modules=["lin"]))


def test_an_unsupported_layer_named_like_a_torch_layer_is_named_by_its_full_class() -> None:
    class Linear(nn.Module):  # as a quantization library's own Linear, which is no nn.Linear
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 2))

    with pytest.raises(TargetNotFoundError, match=r"selected q \((tests\.)?test_robustness\..*<locals>\.Linear\), "
                                                  r"which LoRA cannot adapt \(it adapts MultiheadAttention, Linear"):
        inject(nn.ModuleDict({"q": Linear()}), LoRAConfig(r=2, target_modules=["q"]))


@pytest.mark.parametrize("batch_first", [True, False])
def test_prefix_on_a_transformer_encoder_returns_an_empty_output_for_an_empty_batch(batch_first: bool) -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, batch_first=batch_first),
                                    2, enable_nested_tensor=False).eval()
    empty = torch.zeros((0, 5, 8) if batch_first else (5, 0, 8))
    expected = encoder(empty)
    out = inject(encoder, PrefixTuningConfig(num_tokens=2))(empty)
    assert out.shape == expected.shape == empty.shape



@pytest.mark.parametrize("format", ["native", "peft"])
def test_in_a_distributed_run_only_rank_0_writes_the_adapter_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, format: str
) -> None:
    # two ranks writing one directory would interleave its two files (mismatched save ids): other ranks skip
    import lightning_peft.adapter_files.native as native
    import lightning_peft.adapter_files.peft_save as peft_save

    model = inject(tiny_gpt2(), LoRAConfig(r=2))
    for module in (native, peft_save):
        monkeypatch.setattr(module, "is_nonzero_rank", lambda: True)
    assert save_adapter(model, tmp_path / "rank1", format=format) == tmp_path / "rank1"
    assert not (tmp_path / "rank1").exists()
    for module in (native, peft_save):
        monkeypatch.setattr(module, "is_nonzero_rank", lambda: False)
    save_adapter(model, tmp_path / "rank0", format=format)
    reloaded = adapter_state_dict(load_adapter(tiny_gpt2(), tmp_path / "rank0"))
    assert all(torch.equal(reloaded[n], t) for n, t in adapter_state_dict(model).items())

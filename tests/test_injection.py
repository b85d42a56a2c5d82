"""The one injection path: inject owns the loop over a method's sites, the shared config fields and the one
selection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from lightning_peft import (
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TargetNotFoundError,
    adapter_state_dict,
    adapters,
    adapters_disabled,
    inject,
    load_adapter,
    save_adapter,
    unload,
)
from lightning_peft.adapter import Adapter
from lightning_peft.methods import LAYER_NAME, Site, TargetedConfig, init_seed
from lightning_peft.record import find_record


class Scale(Adapter):
    """A user's own method: a learned per-feature gain on a Linear's output (identity at init)."""

    def __init__(self, base: nn.Linear, seed: int) -> None:
        super().__init__()
        self.base_layer = base
        self.seed = seed
        self.gain = nn.Parameter(torch.zeros(base.out_features))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if not self.enabled else out * (1 + self.gain)


@dataclass(eq=False)
class ScaleConfig(TargetedConfig):
    method_name: ClassVar[str] = "test-scale"
    label: ClassVar[str] = "Scale"
    calls: list[str] | None = None  # the order inject calls the steps in (not a saved field in real methods)

    def sites(self, model: nn.Module) -> list[Site[None]]:
        self._log("sites")
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return [Site(name, module, None) for name, module in self.select(model, linears, "Linear")]

    def build(self, model: nn.Module, site: Site[Any], seed: int) -> Adapter:
        self._log(f"build {site.name}")
        if site.module.out_features == 1:
            raise ValueError(f"a gain on one output is a learning-rate knob; leave {LAYER_NAME} out.")
        return Scale(site.module, seed)

    def finish(self, model: nn.Module, built: list[tuple[str, Adapter]]) -> None:
        self._log(f"finish {[name for name, _ in built]}")

    def _log(self, step: str) -> None:
        if self.calls is not None:
            self.calls.append(step)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))


def test_inject_runs_a_methods_steps_in_order_records_origins_seeds_by_name_and_freezes_the_rest() -> None:
    calls: list[str] = []
    method = ScaleConfig(target_modules=["0", "2"], trainable_modules=["3"], seed=5, calls=calls)
    model = inject(net(), method)
    assert calls == ["sites", "build 0", "build 2", "finish ['0', '2']"]
    assert [(n, type(a).__name__) for n, a in adapters(model)] == [("0", "Scale"), ("2", "Scale")]
    assert [a.seed for _, a in adapters(model)] == [init_seed(5, "0"), init_seed(5, "2")]
    origins = [find_record(a).origin for _, a in adapters(model)]
    assert [(o.position, o.method, o.name) for o in origins] == [(0, method, "0"), (0, method, "2")]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.gain", "2.gain", "3.bias", "3.weight"]
    assert sorted(adapter_state_dict(model)) == ["0.gain", "2.gain", "3.bias", "3.num_batches_tracked",
                                                 "3.running_mean", "3.running_var", "3.weight"]


def test_a_users_method_saves_and_loads_through_the_registry_of_configs(tmp_path: Any) -> None:
    model = inject(net().eval(), ScaleConfig(target_modules=["0"]))
    with torch.no_grad():
        model[0].gain.uniform_(-1, 1)
    save_adapter(model, tmp_path)
    fresh = load_adapter(net().eval(), tmp_path)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), model(x))
    with adapters_disabled(fresh):
        assert torch.equal(fresh(x), net().eval()(x))


def test_an_error_while_building_names_the_layer_with_the_methods_label_and_keeps_its_type() -> None:
    model = nn.Sequential(nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"^Scale cannot adapt '0': .* leave '0' out\.$"):
        inject(model, ScaleConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match=r"LoRA cannot adapt '0': init='pissa' with r=4 needs r <= 1"):
        inject(nn.Sequential(nn.Linear(4, 1)), LoRAConfig(r=4, init="pissa", target_modules=["0"]))


def test_every_method_shares_one_selection_error_text() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                    enable_nested_tensor=False)
    for method in [LoRAConfig(target_modules=["self_atn"]), PrefixTuningConfig(target_modules=["self_atn"]),
                   ScaleConfig(target_modules=["self_atn"])]:
        with pytest.raises(TargetNotFoundError, match=r"target_modules=\['self_atn'\] matched nothing in "
                                                      r"TransformerEncoder\. Closest module names: layers\.0\."):
            inject(encoder, method)
    with pytest.raises(TargetNotFoundError, match=r"selected layers\.0\.linear1 \(Linear\), which prefix tuning "
                                                  r"cannot adapt \(it adapts attention modules\)"):
        inject(encoder, PrefixTuningConfig(target_modules=["layers.0.linear1"]))


def test_prefix_tuning_takes_exclude_modules_and_layers_pattern_like_lora() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 3,
                                    enable_nested_tensor=False)
    model = inject(encoder, PrefixTuningConfig(num_tokens=2, exclude_modules=["layers.1"]))
    assert [n for n, _ in adapters(model)] == ["layers.0.self_attn", "layers.2.self_attn"]
    unload(model)
    model = inject(model, PrefixTuningConfig(num_tokens=2, layers=[1], layers_pattern="layers"))
    assert [n for n, _ in adapters(model)] == ["layers.1.self_attn"]


def test_shared_fields_are_keyword_only_and_validated_once_for_every_method() -> None:
    for config in (LoRAConfig, PrefixTuningConfig, PromptTuningConfig):
        with pytest.raises(ValueError, match="batchnorm='stats' is not one of 'frozen', 'update'"):
            config(batchnorm="stats")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="adapter_dtype='fp8' is not one of 'auto'"):
            config(adapter_dtype="fp8")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="seed must be an integer; got 1.5"):
            config(seed=1.5)  # type: ignore[arg-type]
    assert LoRAConfig(4, 8.0).r == 4 and LoRAConfig(4, 8.0).alpha == 8.0  # the method's own numbers stay positional
    shared = {"trainable_modules", "batchnorm", "seed", "adapter_dtype"}
    targeted = {"target_modules", "exclude_modules", "layers", "layers_pattern"}
    for config, expected in [(LoRAConfig, shared | targeted), (PrefixTuningConfig, shared | targeted),
                             (PromptTuningConfig, shared)]:
        assert {f.name for f in dataclasses.fields(config) if f.kw_only} == expected

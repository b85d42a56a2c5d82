"""Target selection: each rule, the shortcuts, filters, per-layer overrides, and the error texts."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_peft.errors import TargetNotFoundError
from lightning_peft.injection import inject
from lightning_peft.lora import LoRAConfig, LoRALayer
from lightning_peft.targets import layer_index, select_modules, select_names

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _adaptable(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, types)]


class MyLinear(nn.Linear):
    """A user subclass: class rules and class names select it as an nn.Linear."""


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), MyLinear(8, 8)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = SelfAttention()
        self.conv = nn.Conv1d(8, 8, 1)
        self.norm = nn.LayerNorm(8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Layer() for _ in range(3)])
        self.stem = nn.Conv2d(3, 8, 3)
        self.classifier = nn.Linear(8, 2)


def _names(targets: object, **kwargs: object) -> list[str]:
    model = Net()
    selected = select_modules(model, targets, candidates=_adaptable(model, SUPPORTED),  # type: ignore[arg-type]
                              kinds="Linear, Conv, Embedding", **kwargs)
    return [n for n, _ in selected]


def _layer_names(kind: str, layers: range = range(3)) -> list[str]:
    return [f"encoder.layer.{i}.{kind}" for i in layers]


def test_exact_name_selects_only_that_module() -> None:
    assert _names(["encoder.layer.1.attention.query"]) == ["encoder.layer.1.attention.query"]


def test_dotted_suffix_selects_at_name_boundaries() -> None:
    assert _names(["query"]) == _layer_names("attention.query")
    assert _names(["attention.key"]) == _layer_names("attention.key")
    with pytest.raises(TargetNotFoundError, match=r"target_modules=\['uery'\] matched nothing"):
        _names(["uery"])  # a suffix must start at a dot


def test_single_string_is_a_full_match_regex() -> None:
    assert _names(r"encoder\.layer\.[01]\.attention\.(query|key)") == [
        "encoder.layer.0.attention.query", "encoder.layer.0.attention.key",
        "encoder.layer.1.attention.query", "encoder.layer.1.attention.key"]
    with pytest.raises(TargetNotFoundError, match="target_modules='query' matched nothing"):
        _names("query")  # a partial match is not enough
    assert _names([r".*layer\.2\..*key"]) == ["encoder.layer.2.attention.key"]  # a regex entry in a list


def test_class_and_class_name_rules_select_subclasses() -> None:
    assert _names([nn.Conv1d]) == _layer_names("conv")
    assert _names(["Conv1d"]) == _names(["torch.nn.modules.conv.Conv1d"]) == _layer_names("conv")
    assert _names(["MyLinear"]) == _layer_names("attention.value")
    linears = _names([nn.Linear])
    assert linears == _names(["Linear"]) and set(_layer_names("attention.value")) < set(linears)


def test_all_linear_excludes_output_heads_and_all_conv_takes_every_conv() -> None:
    linear = _names("all-linear")
    assert "classifier" not in linear
    assert linear == [f"encoder.layer.{i}.attention.{p}" for i in range(3) for p in ("query", "key", "value")]
    assert _names("all-conv") == [*_layer_names("conv"), "stem"]
    assert _names(["all-conv", "embed"]) == ["embed", *_layer_names("conv"), "stem"]


@pytest.mark.parametrize(("model_class", "head", "kept"), [
    ("BertForSequenceClassification", "classifier", "bert.encoder.layer.0.attention.self.query"),
    ("BertForMaskedLM", "cls.predictions.decoder", "cls.predictions.transform.dense"),  # found via get_output_embeddings
    ("GPT2LMHeadModel", "lm_head", "transformer.h.0.attn.c_attn"),  # transformers Conv1D counts as linear
])
def test_all_linear_excludes_transformers_heads(model_class: str, head: str, kept: str) -> None:
    transformers = pytest.importorskip("transformers")
    if model_class.startswith("GPT2"):
        config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30, n_positions=8)
    else:
        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=30, max_position_embeddings=8)
    model = getattr(transformers, model_class)(config)
    supported = (nn.Linear, transformers.pytorch_utils.Conv1D)
    adaptable = _adaptable(model, supported)
    names = [n for n, _ in select_modules(model, "all-linear", candidates=adaptable, kinds="linear layers")]
    assert kept in names and head not in names
    assert head in [n for n, _ in select_modules(model, [head], candidates=adaptable, kinds="linear layers")]  # still selectable by name


def test_exclude_modules_skips_a_module_and_everything_under_it() -> None:
    assert _names(["query", "key"], exclude=["encoder.layer.1.attention"]) == [
        "encoder.layer.0.attention.query", "encoder.layer.0.attention.key",
        "encoder.layer.2.attention.query", "encoder.layer.2.attention.key"]
    assert _names("all-linear", exclude=r".*\.(key|value)") == _layer_names("attention.query")
    with pytest.raises(TargetNotFoundError, match=r"matched nothing in Net after exclude_modules=\['attention'\]"):
        _names(["query"], exclude=["attention"])


def test_layers_filter_with_and_without_layers_pattern() -> None:
    assert _names(["query"], layers=[0, 2]) == _layer_names("attention.query", [0, 2])
    assert _names(["query"], layers=[1], layers_pattern="layer") == ["encoder.layer.1.attention.query"]
    assert layer_index("blocks.0.sub.2.fc") == 0 and layer_index("blocks.0.sub.2.fc", "sub") == 2
    assert layer_index("blocks.0.fc", "layer") is None
    with pytest.raises(TargetNotFoundError, match=r"after layers=\[7\]"):
        _names(["query"], layers=[7])


def test_rank_and_alpha_patterns_override_per_layer() -> None:
    model = inject(Net(), LoRAConfig(r=4, alpha=8.0, target_modules=["query", "key"],
                                     rank_pattern={r"encoder\.layer\.0\..*": 2}, alpha_pattern={"key": 2.0}))
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert {n: (m.r, m.scale) for n, m in adapters.items()} == {
        "encoder.layer.0.attention.query": (2, 8.0 / 2), "encoder.layer.0.attention.key": (2, 2.0 / 2),
        "encoder.layer.1.attention.query": (4, 8.0 / 4), "encoder.layer.1.attention.key": (4, 2.0 / 4),
        "encoder.layer.2.attention.query": (4, 8.0 / 4), "encoder.layer.2.attention.key": (4, 2.0 / 4)}
    assert adapters["encoder.layer.0.attention.query"].lora_A.shape == (2, 8)


def test_no_match_error_lists_closest_names_with_types() -> None:
    with pytest.raises(TargetNotFoundError) as info:
        _names(["qeury"])
    message = str(info.value)
    assert message.startswith("target_modules=['qeury'] matched nothing in Net. Closest module names: ")
    assert "encoder.layer.0.attention.query (Linear)" in message
    assert "Pass exact names, dotted suffixes, a full-match regex, a module type" in message
    with pytest.raises(TargetNotFoundError, match=r"\['nope'\] matched nothing"):
        _names(["query", "nope"])  # every entry of a list must select something


def test_unsupported_type_error_names_the_type_and_adaptable_neighbours() -> None:
    with pytest.raises(TargetNotFoundError, match=re.escape(
            "target_modules=['norm'] selected encoder.layer.0.norm (LayerNorm), encoder.layer.1.norm (LayerNorm), "
            "encoder.layer.2.norm (LayerNorm), which LoRA cannot adapt (it adapts ")) as info:
        inject(Net(), LoRAConfig(target_modules=["norm"]))
    assert "Closest adaptable modules: " in str(info.value) and "(Linear)" in str(info.value)


def test_invalid_regex_string_says_how_to_pass_names() -> None:
    with pytest.raises(ValueError, match=r"target_modules='query\[' is a single string, so it is read as a regular "
                                         r"expression.*Pass a list of names"):
        _names("query[")


def test_trainable_modules_rules_and_error() -> None:
    assert select_names(Net(), ["classifier", "norm"]) == [*_layer_names("norm"), "classifier"]
    with pytest.raises(TargetNotFoundError, match=r"trainable_modules=\['clasifier'\] matched nothing in Net. "
                                                  r"Closest module names: classifier \(Linear\)"):
        inject(Net(), LoRAConfig(target_modules=["query"], trainable_modules=["clasifier"]))
    with pytest.raises(TargetNotFoundError, match=r"trainable_modules=\['nope'\] matched nothing"):  # one typo of two
        select_names(Net(), ["classifier", "nope"])


def test_multihead_attention_out_proj_selection_adapts_the_attention_module() -> None:
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    inject(model, LoRAConfig(r=2, target_modules="all-linear"))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALayer))
    assert adapted == ["linear1", "linear2", "self_attn"]
    x = torch.randn(2, 3, 8)
    assert model(x).shape == x.shape

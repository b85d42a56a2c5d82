"""Named adapters (lightning_peft.named): add, switch, disable, delete; merge-and-unload into a plain model that
loads without lightning_peft."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_peft import (
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    active_adapter,
    adapter_state_dict,
    adapters,
    add_adapter,
    delete_adapter,
    inject,
    list_adapters,
    merge_and_unload,
    set_adapter,
)

TOL = dict(atol=1e-5, rtol=1e-4)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def randomize(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for the active adapter's tensors (B != 0); returns a copy of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in adapter_state_dict(model).items():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return {k: v.clone() for k, v in adapter_state_dict(model).items()}


def lora_formula(base: nn.Sequential, x: torch.Tensor, t: dict[str, torch.Tensor], scales: dict[str, float]) -> torch.Tensor:
    """The adapted MLP written out: each layer ``W x + b + s · B A x`` where the adapter has tensors."""
    def layer(i: int, h: torch.Tensor) -> torch.Tensor:
        out = base[i](h)
        if f"{i}.lora_A" in t:
            out = out + scales[str(i)] * h @ t[f"{i}.lora_A"].T @ t[f"{i}.lora_B"].T
        return out
    return layer(2, torch.relu(layer(0, x)))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def two_adapters() -> tuple[nn.Module, nn.Sequential, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base = mlp()
    model = inject(copy.deepcopy(base), LoRAConfig(r=2, alpha=4.0, target_modules=["0"]))  # unnamed: "default"
    a = randomize(model, 1)
    add_adapter(model, "b", LoRAConfig(r=3, alpha=3.0, target_modules=["0", "2"]))
    b = randomize(model, 2)
    return model, base, a, b


def test_switching_gives_each_adapter_its_own_outputs() -> None:
    model, base, a, b = two_adapters()
    assert list_adapters(model) == ["default", "b"] and active_adapter(model) == "b"
    with torch.no_grad():
        torch.testing.assert_close(model(X), lora_formula(base, X, b, {"0": 1.0, "2": 1.0}), **TOL)
        set_adapter(model, "default")
        torch.testing.assert_close(model(X), lora_formula(base, X, a, {"0": 2.0}), **TOL)
        set_adapter(model, "b")
        torch.testing.assert_close(model(X), lora_formula(base, X, b, {"0": 1.0, "2": 1.0}), **TOL)


def test_active_adapter_keeps_the_single_adapter_names_and_alone_trains() -> None:
    model, _, a, b = two_adapters()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(b) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    set_adapter(model, "default")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(a) == ["0.lora_A", "0.lora_B"]
    assert sorted(model.state_dict()) == ["0.base_layer.bias", "0.base_layer.weight", "0.lora_A", "0.lora_B",
                                          "2.bias", "2.weight"]


def test_disable_gives_the_base_outputs_and_delete_removes_inactive_adapters() -> None:
    model, base, a, _ = two_adapters()
    with torch.no_grad():
        torch.testing.assert_close(set_adapter(model, None)(X), base(X))
    assert active_adapter(model) is None and not list(adapters(model))
    with pytest.raises(ValueError, match="active adapter"):
        delete_adapter(set_adapter(model, "b"), "b")
    delete_adapter(model, "default")
    assert list_adapters(model) == ["b"]
    with pytest.raises(KeyError, match="no adapter named 'default'"):
        set_adapter(model, "default")


def test_trainable_modules_are_kept_per_adapter_and_restored_to_base() -> None:
    base = mlp()
    model = add_adapter(copy.deepcopy(base), "a", LoRAConfig(r=2, target_modules=["0"], trainable_modules=["2"]))
    a = randomize(model, 1)  # includes the head "2.weight"/"2.bias": our stand-in for training
    add_adapter(model, "b", LoRAConfig(r=2, alpha=2.0, target_modules=["0"]))
    b = randomize(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(X), lora_formula(base, X, b, {"0": 1.0}), **TOL)  # the untrained head
        set_adapter(model, "a")
        trained = copy.deepcopy(base)
        trained[2].weight.copy_(a["2.weight"]), trained[2].bias.copy_(a["2.bias"])
        torch.testing.assert_close(model(X), lora_formula(trained, X, a, {"0": 8.0}), **TOL)
        torch.testing.assert_close(set_adapter(model, None)(X), base(X))


def test_adding_an_adapter_without_a_head_trained_before_naming_raises_and_keeps_the_model() -> None:
    model = inject(mlp(), LoRAConfig(r=2, target_modules=["0"], trainable_modules=["2"]))
    randomize(model, 1)
    before = model(X).detach()
    with pytest.raises(ValueError, match="base value is gone"):
        add_adapter(model, "b", LoRAConfig(r=2, target_modules=["0"]))
    assert list_adapters(model) == ["default"] and active_adapter(model) == "default"
    torch.testing.assert_close(model(X), before)


def test_switching_a_merged_adapter_raises_with_the_fix() -> None:
    from lightning_peft import merge

    model, _, _, _ = two_adapters()
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        set_adapter(model, "default")


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_named_prefix_and_prompt_adapters_switch_on_a_transformers_model(kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                                                n_positions=64)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))

    def method(p: int, seed: int) -> object:
        return PrefixTuningConfig(num_tokens=p, seed=seed) if kind == "prefix" else PromptTuningConfig(
            num_tokens=p, kind="tokens", seed=seed)

    model = add_adapter(copy.deepcopy(base), "short", method(2, 1))
    short = model(ids).logits.detach()
    add_adapter(model, "long", method(4, 2))
    long = model(ids).logits.detach()
    alone = inject(copy.deepcopy(base), method(4, 2))(ids).logits  # same seed, same init: the adapter alone
    torch.testing.assert_close(long, alone.detach(), **TOL)
    assert (short - long).abs().max() > 1e-3
    torch.testing.assert_close(set_adapter(model, "short")(ids).logits, short, **TOL)
    torch.testing.assert_close(set_adapter(model, None)(ids).logits, base(ids).logits, **TOL)
    set_adapter(model, "long")
    names = {"prefix_keys", "prefix_values"} if kind == "prefix" else {"prompt"}
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == names


BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning_peft" or name.startswith("lightning_peft."):
            raise ImportError("lightning_peft is blocked in this process")
sys.meta_path.insert(0, _Block())
"""


def run_without_lightning_peft(code: str, tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(BLOCKER + textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


@pytest.mark.slow
def test_merge_and_unload_gives_a_plain_model_that_loads_without_lightning_peft(tmp_path: Path) -> None:
    model, base, _, b = two_adapters()  # named adapters too: nothing of them may stay behind
    expected = lora_formula(base, X, b, {"0": 1.0, "2": 1.0}).detach()
    plain = merge_and_unload(model)
    torch.save(plain, tmp_path / "model.pt")
    torch.save(plain.state_dict(), tmp_path / "state.pt")
    torch.save({"x": X, "y": expected}, tmp_path / "io.pt")
    run_without_lightning_peft("""
        import torch
        from torch import nn
        try:
            import lightning_peft
            raise SystemExit("the blocker did not block")
        except ImportError:
            pass
        io = torch.load("io.pt")
        whole = torch.load("model.pt", weights_only=False)
        fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        fresh.load_state_dict(torch.load("state.pt", weights_only=True))
        for m in (whole, fresh):
            torch.testing.assert_close(m(io["x"]), io["y"], atol=1e-5, rtol=1e-4)
        assert type(whole[0]) is nn.Linear
        print("OK")
    """, tmp_path)


@pytest.mark.slow
def test_merged_transformers_model_round_trips_save_pretrained_without_lightning_peft(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                                                n_positions=64)).eval()
    model = inject(base, LoRAConfig(r=4, alpha=8.0))
    randomize(model, 3)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits.detach()
    merge_and_unload(model).save_pretrained(tmp_path / "merged")
    torch.save({"ids": ids, "y": expected}, tmp_path / "io.pt")
    run_without_lightning_peft("""
        import torch, transformers
        io = torch.load("io.pt")
        model = transformers.AutoModelForCausalLM.from_pretrained("merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(io["ids"]).logits, io["y"], atol=1e-5, rtol=1e-4)
        print("OK")
    """, tmp_path)

"""lightning-peft-export: adapters out of a Lightning checkpoint, without a Trainer, in our format and PEFT's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import AdapterStateError, LoRA, load_adapter, load_from_checkpoint
from lightning_peft.adapter_files.export import export, main

transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-5, rtol=1e-4)
IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(5))


class CausalLM(L.LightningModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = transformers.GPT2LMHeadModel.from_pretrained(path)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=5e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny GPT-2 saved with save_pretrained, LoRA-finetuned for 2 steps; its checkpoint and logits."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50,
                                                         n_positions=64)).save_pretrained(root / "base")
    module = CausalLM(str(root / "base"))
    saver = ModelCheckpoint(dirpath=root / "ckpt")
    data = torch.utils.data.DataLoader(torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(0)),
                                       batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LoRA(r=4, alpha=8.0, target_modules=["c_attn", "c_fc"],
                                                                    trainable_modules=["ln_f"]), saver])
    trainer.fit(module, data)
    module.eval()
    with torch.no_grad():
        logits = module.model(IDS).logits
    return {"root": root, "ckpt": saver.best_model_path, "logits": logits}


def base_model(trained: dict[str, Any]) -> torch.nn.Module:
    return transformers.GPT2LMHeadModel.from_pretrained(trained["root"] / "base").eval()


def test_native_export_without_a_model_loads_into_the_base_with_the_trained_outputs(trained: dict[str, Any],
                                                                                   tmp_path: Path) -> None:
    assert main([trained["ckpt"], str(tmp_path / "native"), "--prefix", "model."]) == 0
    model = load_adapter(base_model(trained), tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, trained["logits"], **TOL)
        assert (base_model(trained)(IDS).logits - trained["logits"]).abs().max() > 1e-3  # training changed it


def test_peft_export_loads_in_hf_peft_with_the_trained_outputs(trained: dict[str, Any], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    export(trained["ckpt"], tmp_path / "peft", format="peft", base=str(trained["root"] / "base"), prefix="model.")
    theirs = peft.PeftModel.from_pretrained(base_model(trained), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, trained["logits"], **TOL)


def test_peft_export_without_a_base_and_a_wrong_prefix_fail_with_the_fix(trained: dict[str, Any], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([trained["ckpt"], str(tmp_path / "x"), "--format", "peft", "--prefix", "model."]) == 2
    assert "needs the base model (--base" in capsys.readouterr().err
    assert main([trained["ckpt"], str(tmp_path / "x"), "--prefix", "net."]) == 2
    assert "names start with ['model.']" in capsys.readouterr().err


def test_a_directory_that_is_no_deepspeed_checkpoint_is_refused_with_what_was_looked_for(tmp_path: Path,
                                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    assert main([str(tmp_path / "run"), str(tmp_path / "x")]) == 2
    assert "not a DeepSpeed checkpoint (no checkpoint/mp_rank_00_model_states.pt" in capsys.readouterr().err


def test_load_from_checkpoint_rebuilds_a_callback_trained_module_bitwise(trained: dict[str, Any]) -> None:
    module = load_from_checkpoint(CausalLM, trained["ckpt"]).eval()  # the path comes from the saved hyperparameters
    with torch.no_grad():
        assert torch.equal(module.model(IDS).logits, trained["logits"])
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n in module.state_dict() if ".lora_" in n or ".ln_f." in n}  # LoRA and trainable_modules train again


@pytest.mark.parametrize("inner", [False, True], ids=["lightning_module", "inner_model"])
def test_load_adapter_reads_a_lightning_checkpoint_into_the_module_or_its_inner_model(trained: dict[str, Any],
                                                                                     inner: bool) -> None:
    model: torch.nn.Module = base_model(trained) if inner else CausalLM(str(trained["root"] / "base"))
    load_adapter(model, Path(trained["ckpt"])).eval()
    with torch.no_grad():
        logits = (model if inner else model.model)(IDS).logits
    assert torch.equal(logits, trained["logits"])


def test_load_adapter_given_a_file_of_an_adapter_directory_reads_the_directory(trained: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    assert main([trained["ckpt"], str(tmp_path / "native"), "--prefix", "model."]) == 0
    model = load_adapter(base_model(trained), tmp_path / "native" / "adapter_model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, trained["logits"], **TOL)


def test_a_checkpoint_saved_without_adapters_is_refused_naming_the_plain_route(trained: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    del checkpoint["lightning_peft"]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    model = base_model(trained)
    refusal = r"plain.ckpt: .*no 'lightning_peft' adapter record.*load_from_checkpoint"
    with pytest.raises(AdapterStateError, match=refusal):
        load_adapter(model, tmp_path / "plain.ckpt")
    with pytest.raises(AdapterStateError, match="no 'lightning_peft' adapter record"):
        load_from_checkpoint(CausalLM, tmp_path / "plain.ckpt")
    assert not any(p.requires_grad is False for p in model.parameters())  # left as it was: nothing frozen


class Opaque:
    """A class a weights-only load does not know."""


def test_checkpoint_pickling_unknown_classes_is_refused_unless_trusted(trained: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["hyper_parameters"]["extra"] = Opaque()
    torch.save(checkpoint, tmp_path / "opaque.ckpt")
    with pytest.raises(ValueError, match="Opaque.*--allow-global"):
        export(tmp_path / "opaque.ckpt", tmp_path / "a", prefix="model.")
    export(tmp_path / "opaque.ckpt", tmp_path / "b", prefix="model.", allow_globals=[f"{__name__}.Opaque"])
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_python_dash_m_runs_the_command(trained: dict[str, Any], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lightning_peft.adapter_files.export", trained["ckpt"],
                             str(tmp_path / "m"), "--prefix", "model.", "--base", "none"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_adapter(base_model(trained), tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, trained["logits"], **TOL)

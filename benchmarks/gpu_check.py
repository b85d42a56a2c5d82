"""GPU checks that CPU CI cannot run: Lightning's FSDP1 and DeepSpeed on one device, bf16-true, 16-mixed, QLoRA and
prefix/prompt on an nf4 base, torch.compile, for LoRA, prefix and prompt tuning.

Run on one CUDA GPU (about 2 minutes): ``python benchmarks/gpu_check.py``; ``GPU_CHECKS=name,name`` runs a subset.
The DeepSpeed checks need ``deepspeed`` and the nf4 checks ``bitsandbytes``. Each check prints PASS or FAIL with its
numbers; the exit status is the number of failures. Results: ``benchmarks/results/gpu_check.txt``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_peft import LoRA, PrefixTuning, PromptTuning, adapter_state_dict, fsdp_auto_wrap_policy, inject, merge, unmerge  # noqa: E402

VOCAB, SEQ = 512, 64


def llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


class LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = llama()
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(1)).repeat(8, 1)
        return DataLoader(TensorDataset(tokens), batch_size=8)


def fit(*callbacks: L.Callback, steps: int = 8, ckpt_path: str | None = None,
        **trainer_kwargs: object) -> tuple[LM, L.Trainer, float]:
    module = LM()
    # the rows repeat 8 sequences: read in order, every batch is those 8. A distributed strategy's shuffling sampler
    # would draw batches of different copies, whose loss differences drown the small first steps of prefix tuning
    trainer = L.Trainer(accelerator="cuda", devices=1, max_steps=steps, callbacks=list(callbacks), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        **trainer_kwargs)  # type: ignore[arg-type]
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer, time.perf_counter() - start


def lora(**kwargs: str) -> LoRA:
    return LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], **kwargs)


def prefix(**kwargs: str) -> PrefixTuning:
    return PrefixTuning(num_tokens=4, **kwargs)


def prompt(**kwargs: str) -> PromptTuning:
    return PromptTuning(num_tokens=4, init="random", **kwargs)


def check_precision(precision: str, method: L.Callback | None = None, **lora_kwargs: str) -> str:
    module, _, seconds = fit(method or lora(**lora_kwargs), precision=precision)
    tensors = adapter_state_dict(module)
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    assert module.losses[-1] < module.losses[0], module.losses
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    return f"loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}, adapter dtypes {dtypes}, {seconds:.1f}s"


def check_fsdp1(method: L.Callback | None = None, precision: str = "bf16-mixed") -> str:
    """FSDPStrategy (full checkpoint, Lightning's default use_orig_params=True) with the wrap policy: the adapters
    train; LoRA and prefix get units of their own (no unit mixes trainable and frozen tensors); the checkpoint holds
    exactly the adapter tensors. A token prompt shares the root unit (read by a hook on the model). On one device
    FSDP1 runs NO_SHARD; in 32-true its frozen units need lightning_peft's mend after each backward."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    method = method or lora()
    with tempfile.TemporaryDirectory() as tmp:
        strategy = FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(LlamaDecoderLayer), state_dict_type="full")
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module, trainer, seconds = fit(method, checkpoint, strategy=strategy, precision=precision)
        mixed = [str(w.message)[:60] for w in caught if "requires_grad=True and False" in str(w.message)]
        assert not mixed or isinstance(method, PromptTuning), mixed
        saved = torch.load(Path(tmp) / "last.ckpt", weights_only=True)
        keys = set(saved["state_dict"])
        assert keys == set(_fresh_adapted(method)), sorted(keys)[:5]
        size = (Path(tmp) / "last.ckpt").stat().st_size
    assert module.losses[-1] < module.losses[0], module.losses
    return (f"loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}, {len(mixed)} mixed units, checkpoint "
            f"{len(keys)} adapter tensors, {size / 1e6:.2f} MB, {seconds:.1f}s")


def check_qlora() -> str:
    import bitsandbytes as bnb
    from lightning.pytorch.plugins import BitsandbytesPrecision

    merged: dict[str, object] = {}

    class MergeOnGPU(L.Callback):  # before teardown moves the model back to the CPU
        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            tokens = torch.randint(0, VOCAB, (2, SEQ), device=module.device)
            module.eval()
            with torch.no_grad():
                before = module.model(input_ids=tokens).logits.float()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    merge(module)
                after = module.model(input_ids=tokens).logits.float()
            merged["diff"] = (after - before).abs().max().item()
            merged["warnings"] = sorted({str(w.message)[:70] for w in caught})
            merged["base_after"] = type(module.model.model.layers[0].self_attn.q_proj.base_layer).__name__

    quantized: dict[str, object] = {}

    class Inspect(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            layer = module.model.model.layers[0].self_attn.q_proj
            quantized["4bit"] = isinstance(layer.base_layer, bnb.nn.Linear4bit)
            quantized["adapter"] = str(layer.lora_A.dtype)

    module, _, seconds = fit(lora(), Inspect(), MergeOnGPU(), plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16))
    assert quantized["4bit"] and module.losses[-1] < module.losses[0], (quantized, module.losses)
    return (f"base quantized {quantized}, loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}, after merge base is "
            f"{merged['base_after']}, merged vs unmerged max|diff| {merged['diff']:.3g} (bf16), "
            f"warnings {merged['warnings']}, {seconds:.1f}s")


def check_fsdp1_sharded_resume(orig_params: bool = True) -> str:
    """FSDPStrategy(state_dict_type="sharded"): the checkpoint directory holds adapter tensors only and resumes;
    ``orig_params=False``: with flat parameters, which hide the adapter tensors from ``named_parameters()``."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.checkpoint import FileSystemReader
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def strategy() -> FSDPStrategy:
        return FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(LlamaDecoderLayer), state_dict_type="sharded",
                            use_orig_params=orig_params)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True)
        fit(lora(), checkpoint, strategy=strategy(), precision="bf16-mixed")
        last = Path(tmp) / "last.ckpt"
        # FSDPStrategy stores the module's tensors under "model.", the optimizer's under "optimizer_<i>."
        metadata = FileSystemReader(str(last)).read_metadata().state_dict_metadata
        keys = {k.removeprefix("model.") for k in metadata if k.startswith("model.")}
        assert keys == set(_fresh_adapted(lora())), sorted(keys)[:5]
        module, trainer, seconds = fit(lora(), steps=12, ckpt_path=str(last), strategy=strategy(), precision="bf16-mixed")
    assert trainer.global_step == 12 and len(module.losses) == 4, (trainer.global_step, module.losses)
    return f"sharded checkpoint: {len(keys)} adapter tensors only; resumed at step 8 to 12, {seconds:.1f}s"


def check_quantized_base(method: L.Callback) -> str:
    """Prefix or prompt tuning on a base that BitsandbytesPrecision quantizes: its Linears become 4-bit, the
    prefix/prompt tensors (no nn.Linear of their own) stay floating point and train."""
    import bitsandbytes as bnb
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module, _, seconds = fit(method, plugins=BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16))
    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    dtypes = sorted({str(t.dtype) for t in adapter_state_dict(module).values()})
    assert quantized and all("float" in d for d in dtypes), (quantized, dtypes)
    assert module.losses[-1] < module.losses[0], module.losses
    return f"{quantized} 4-bit Linears, adapter dtypes {dtypes}, loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}, {seconds:.1f}s"


def check_compile(method: L.Callback | None = None) -> str:
    model = inject(llama().cuda(), method or lora())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda")
    eager = model(input_ids=tokens).logits
    compiled_model = torch.compile(model)
    compiled = compiled_model(input_ids=tokens).logits
    diff = (compiled - eager).abs().max().item()
    assert diff < 1e-3, diff
    if method is not None and not isinstance(method, LoRA):
        return f"compiled vs eager max|diff| {diff:.2e}"
    merge(model)
    merged = model(input_ids=tokens).logits
    unmerge(model)
    return f"compiled vs eager max|diff| {diff:.2e}; merged vs eager {(merged - eager).abs().max().item():.2e}"


def check_deepspeed(stage: int, method: L.Callback) -> str:
    """ZeRO-2/3 on one GPU: the checkpoint DeepSpeed writes holds the adapter tensors only, with their full shapes."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError("deepspeed is not installed (carry its wheel: see README 'Scaling out')")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_peft.adapter_files.export import read_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        strategy = DeepSpeedStrategy(stage=stage)  # the callback sets exclude_frozen_parameters=True
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True)
        module, _, seconds = fit(method, checkpoint, strategy=strategy, precision="bf16-mixed")
        state = read_checkpoint(Path(tmp) / "last.ckpt")["state_dict"]  # joins ZeRO-3 slices; weights_only loads
        expected = {n: shape for n, shape in ((n, list(p.shape)) for n, p in _fresh_adapted(method).items())}
        saved = {n: list(t.shape) for n, t in state.items()}
    assert saved == expected, (sorted(saved)[:4], sorted(expected)[:4])
    assert module.losses[-1] < module.losses[0], module.losses
    return f"stage {stage}: {len(saved)} adapter tensors with full shapes, loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}, {seconds:.1f}s"


def _fresh_adapted(method: L.Callback) -> dict[str, torch.Tensor]:
    module = LM()
    inject(module, type(method)(**{k: v for k, v in method.to_dict().items() if k != "method"}))
    return adapter_state_dict(module)


CHECKS: dict[str, Callable[[], str]] = {
    "bf16-true": lambda: check_precision("bf16-true"),
    "bf16-true+fp32-adapters": lambda: check_precision("bf16-true", adapter_dtype="float32"),
    "16-mixed": lambda: check_precision("16-mixed"),
    "bf16-mixed": lambda: check_precision("bf16-mixed"),
    "fsdp1-1gpu": check_fsdp1,
    "fsdp1-1gpu-32-true": lambda: check_fsdp1(precision="32-true"),
    "fsdp1-sharded-resume": check_fsdp1_sharded_resume,
    "fsdp1-sharded-flat-resume": lambda: check_fsdp1_sharded_resume(orig_params=False),
    "qlora-nf4": check_qlora,
    "16-mixed-prefix": lambda: check_precision("16-mixed", prefix()),
    "16-mixed-prompt": lambda: check_precision("16-mixed", prompt()),
    "nf4-base-prefix": lambda: check_quantized_base(prefix()),
    "nf4-base-prompt": lambda: check_quantized_base(prompt()),
    "compile": check_compile,
    "deepspeed-zero2-lora": lambda: check_deepspeed(2, lora()),
    "deepspeed-zero3-prompt": lambda: check_deepspeed(3, prompt()),
    "deepspeed-zero3-lora": lambda: check_deepspeed(3, lora()),
    "deepspeed-zero2-prefix": lambda: check_deepspeed(2, prefix()),
    "deepspeed-zero3-prefix": lambda: check_deepspeed(3, prefix()),
    "deepspeed-zero2-prompt": lambda: check_deepspeed(2, prompt()),
}
for _name, _make in (("prefix", prefix), ("prompt", prompt)):  # the LoRA cells above, for prefix and prompt too
    CHECKS |= {
        f"bf16-true-{_name}": lambda make=_make: check_precision("bf16-true", make()),
        f"bf16-true+fp32-adapters-{_name}": lambda make=_make: check_precision("bf16-true", make(adapter_dtype="float32")),
        f"bf16-mixed-{_name}": lambda make=_make: check_precision("bf16-mixed", make()),
        f"fsdp1-1gpu-{_name}": lambda make=_make: check_fsdp1(make()),
        f"compile-{_name}": lambda make=_make: check_compile(make()),
    }
ONLY = [name for name in os.environ.get("GPU_CHECKS", "").split(",") if name]


def main() -> int:
    print(f"torch {torch.__version__}, lightning {L.__version__}, device {torch.cuda.get_device_name()}")
    failures = 0
    for name, check in CHECKS.items():
        if ONLY and name not in ONLY:
            continue
        try:
            print(f"PASS {name}: {check()}", flush=True)
        except Exception as error:  # report every check, not just the first failure
            failures += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc(limit=3)
    return failures


if __name__ == "__main__":
    sys.exit(main())

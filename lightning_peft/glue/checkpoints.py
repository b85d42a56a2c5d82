"""Lightning glue for checkpoints: they hold adapter tensors only, and loading one checks it fits the model.

Both run as steps after the LightningModule's own ``on_save_checkpoint``/``on_load_checkpoint``, so also with
``ModelCheckpoint(save_weights_only=True)`` (which skips callback hooks) and in ``load_from_checkpoint``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_peft.adapter_files.constants import CHECKPOINT_KEY
from lightning_peft.adapter_files.native import checkpoint_metadata
from lightning_peft.errors import AdapterStateError, PEFTWarning
from lightning_peft.fingerprint import fingerprint_mismatch
from lightning_peft.glue.strategies import is_fsdp1_wrapped
from lightning_peft.injection import applied_methods
from lightning_peft.state import check_adapter_state, check_base_shapes
from lightning_peft.tensors import adapter_name_test, adapter_tensors, clean_name
from lightning_peft.zero3 import is_partitioned

__all__ = ["CHECKPOINT_KEY", "check_checkpoint", "keep_adapter_tensors"]


def keep_adapter_tensors(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Drop frozen base weights from a Lightning checkpoint and record the methods and base shapes."""
    if not applied_methods(pl_module):
        return
    is_adapter_tensor = adapter_name_test(pl_module)  # by name: FSDP1's flat parameters hide the tensors
    # FSDP's gathered state dict has the global shapes; ZeRO-3's holds empty partitions, its parameters know them
    zero3 = any(is_partitioned(p) for p in pl_module.parameters())
    checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(pl_module, None if zero3 else checkpoint["state_dict"],
                                                     fingerprint=not is_fsdp1_wrapped(pl_module))
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_tensor(k)}
    # their names: strategies that load the weights before on_load_checkpoint (FSDP, ModelParallel, DeepSpeed)
    # pass no state_dict to check_checkpoint, which then compares these with the model's adapter tensors
    checkpoint[CHECKPOINT_KEY]["tensors"] = sorted(clean_name(k) for k in checkpoint["state_dict"])


def check_checkpoint(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint made for another base model or missing adapter tensors; warn on a plain one.

    Outside a Trainer (``LightningModule.load_from_checkpoint``, which loads strictly) the checkpoint's state
    is completed with the module's own frozen base tensors, so exactly the adapter tensors change.
    """
    if not applied_methods(pl_module):
        return
    meta = checkpoint.get(CHECKPOINT_KEY)
    trainer = getattr(pl_module, "_trainer", None)
    if meta is None and trainer is not None and trainer.state.fn == "fit" and checkpoint.get("optimizer_states"):
        raise AdapterStateError(
            "lightning_peft: fit(ckpt_path=...) resumes a checkpoint saved without lightning_peft adapters: its "
            "optimizer state is for other parameters than the adapters that train now. To start from its weights "
            "with a fresh optimizer, load them first (module.load_state_dict(torch.load(path, weights_only=True)"
            "['state_dict'], strict=False)) and call fit() without ckpt_path."
        )
    if meta is None:
        rank_zero_warn(
            "lightning_peft: the checkpoint has no adapter metadata (it was saved without lightning_peft); "
            "its base weights load, adapters keep their current values."
        )
        return
    if not is_fsdp1_wrapped(pl_module):  # FSDP1's flat shards hold no global shapes or weights to compare
        check_base_shapes(pl_module, meta["base_shapes"])
        mismatch = fingerprint_mismatch(pl_module, meta.get("base_fingerprint"), "the checkpoint")
        if mismatch:
            rank_zero_warn(f"lightning_peft: {mismatch}", category=PEFTWarning)
    now = [method.to_dict() for method in applied_methods(pl_module)]
    if meta.get("methods") != now:  # other targets, ranks or scales: loading would compute something else
        tensors = ""
        if "state_dict" in checkpoint:
            try:
                check_adapter_state(pl_module, checkpoint["state_dict"])
            except AdapterStateError as error:
                tensors = f" {error}"
        raise AdapterStateError(
            f"the checkpoint does not fit the adapters of {type(pl_module).__name__}: it was saved with "
            f"{_differences(meta.get('methods') or [], now)}.{tensors} Use the methods it was saved with (the same "
            "callbacks with the same arguments), or rebuild the module from it with "
            "lightning_peft.load_from_checkpoint()."
        )
    if "state_dict" not in checkpoint:  # the strategy loaded the weights itself (strict=False), before this hook
        saved = meta.get("tensors")
        missing = sorted({name for name, _ in adapter_tensors(pl_module)} - set(saved or []))
        if saved and missing:  # (no names: a ZeRO-3 checkpoint whose module state was empty)
            raise AdapterStateError(
                f"the checkpoint lacks {len(missing)} adapter tensors of {type(pl_module).__name__} "
                f"({', '.join(missing[:4])}): it was saved for other adapters. Inject the methods it was saved with "
                f"({meta.get('methods')})."
            )
        return
    check_adapter_state(pl_module, checkpoint["state_dict"])
    if trainer is None:
        state = checkpoint["state_dict"]
        for name, tensor in pl_module.state_dict().items():
            state.setdefault(name, tensor)


def _differences(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """``"lora r=2 (the model has r=4)"`` for every argument that differs between saved and current methods."""
    if len(saved) != len(now):
        return f"{len(saved)} methods ({[m.get('method') for m in saved]}), the model has {len(now)}"
    return "; ".join(f"{old.get('method')} {key}={old.get(key)!r} (the model has {key}={new.get(key)!r})"
                     for old, new in zip(saved, now, strict=True) for key in new if old.get(key) != new.get(key))

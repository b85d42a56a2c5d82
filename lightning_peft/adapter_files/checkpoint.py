"""Lightning checkpoints read as adapters: a ``.ckpt`` file or DeepSpeed's directory, never executing code.

A checkpoint saved with lightning_peft adapters holds the adapter tensors in ``checkpoint["state_dict"]`` (under
the LightningModule's attribute names) and the methods and base shapes in ``checkpoint["lightning_peft"]``. Every
file is read with ``torch.load(weights_only=True)``; a checkpoint that pickled other objects is refused with the
names of those classes unless they are trusted explicitly (``allow_globals``).
"""

from __future__ import annotations

import importlib
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from lightning_peft.adapter_files.constants import CHECKPOINT_KEY
from lightning_peft.errors import AdapterStateError
from lightning_peft.state import relative_rules

_ZERO3_OPTIMIZER_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


def read_checkpoint(path: str | Path, allow_globals: list[str] | None = None) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; ``allow_globals`` names classes trusted on top.

    A directory is read as a DeepSpeed checkpoint (:func:`read_deepspeed_checkpoint`).

    Raises:
        ValueError: The checkpoint pickles classes that are not allowed; the message lists them.
    """
    if Path(path).is_dir():
        return read_deepspeed_checkpoint(path, allow_globals)
    return _load(path, [_import_global(name) for name in allow_globals or []])


class _Unread:
    """Stands in for a pickled object we do not need (DeepSpeed's loss scalers): built empty, its state dropped."""

    def __setstate__(self, state: Any) -> None:
        pass


# DeepSpeed pickles its ZeRO stage as an IntEnum (read as the int it is) and its loss scaler; neither needs DeepSpeed
_DEEPSPEED_GLOBALS: list[Any] = [
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Unread, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Unread, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


def read_deepspeed_checkpoint(path: str | Path, allow_globals: list[str] | None = None) -> dict[str, Any]:
    """A DeepSpeed checkpoint directory as a Lightning checkpoint: its client state with a full ``state_dict``.

    Lightning's ``DeepSpeedStrategy`` writes such a directory where other strategies write a ``.ckpt`` file; with
    lightning_peft adapters its module state holds the trained tensors only (``exclude_frozen_parameters``). Under
    ZeRO-1/2 they are whole in ``mp_rank_00_model_states.pt``; under ZeRO-3 that file holds empty placeholders and
    each rank's fp32 slices are in its ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, so they are put together
    from all ranks' files. Every file is read with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: ``path`` is not a DeepSpeed checkpoint directory.
    """
    root = Path(path)
    latest = root / "latest"
    folder = root / (latest.read_text().strip() if latest.is_file() else "checkpoint")
    candidates = (folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    model_file = next((f for f in candidates if f.is_file()), None)
    if model_file is None:
        raise ValueError(
            f"{root} is a directory but not a DeepSpeed checkpoint (no {folder.name}/mp_rank_00_model_states.pt or "
            f"{folder.name}/zero_pp_rank_0_mp_rank_00_model_states.pt); pass a .ckpt file or such a directory."
        )
    trusted = [*_DEEPSPEED_GLOBALS, *(_import_global(name) for name in allow_globals or [])]
    states = _load(model_file, trusted)
    trained = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    module = states["module"]
    if any(module[name].numel() != math.prod(shape) for name, shape in trained.items()):  # ZeRO-3 placeholders
        module = {**module, **_zero3_tensors(folder, states["param_shapes"], trusted)}
    # the trained parameters, and buffers of their modules (a trainable BatchNorm's running statistics)
    owners = {name.rpartition(".")[0] for name in trained}
    buffers = {name for name in states.get("buffer_names", []) if name.rpartition(".")[0] in owners}
    state = {name: module[name] for name in module if name in trained or name in buffers}
    return {CHECKPOINT_KEY: states.get(CHECKPOINT_KEY), "state_dict": state}


def _zero3_tensors(folder: Path, param_shapes: list[dict[str, Any]], trusted: list[Any]) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors from the ZeRO-3 optimizer files of every rank.

    DeepSpeed names them ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, with a ``bf16_`` prefix under bf16.
    Each rank holds, for every trained parameter in order, a slice of ``ceil(numel / ranks)`` elements (the last
    padded), concatenated over the parameter groups; parameter ``i`` is the ranks' slices joined, cut to size.
    """
    ranks = {int(match[1]): f for f in folder.iterdir() if (match := _ZERO3_OPTIMIZER_FILE.fullmatch(f.name))}
    if sorted(ranks) != list(range(len(ranks))) or not ranks:
        raise ValueError(
            f"{folder} holds ZeRO-3 placeholders but not one optimizer file per rank (found ranks {sorted(ranks)} of "
            "[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt): copy every rank's files into the checkpoint."
        )
    states = [_load(ranks[rank], trusted)["optimizer_state_dict"] for rank in sorted(ranks)]
    flats = [torch.cat(list(state["fp32_flat_groups"])) for state in states]
    tensors, offset = {}, 0
    for group in param_shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = math.ceil(numel / len(flats))
            tensors[name] = torch.cat([flat[offset:offset + part] for flat in flats])[:numel].view(shape).clone()
            offset += part
    return tensors


def _load(path: str | Path, trusted: list[Any]) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(trusted):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        raise ValueError(
            f"{path} pickles objects a weights-only load refuses ({', '.join(unsafe) or err}); we never execute code "
            "from a checkpoint. If you trust them, pass --allow-global NAME for each (e.g. "
            f"--allow-global {unsafe[0] if unsafe else 'module.Class'})."
        ) from None


def _import_global(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def adapter_from_checkpoint(
    checkpoint: dict[str, Any], prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors and metadata of a Lightning checkpoint, with ``prefix`` stripped from every name.

    Raises:
        AdapterStateError: The checkpoint holds no lightning_peft record (it was saved without adapters).
        ValueError: Nothing is under ``prefix``.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict):
        raise AdapterStateError(
            "the checkpoint holds no 'lightning_peft' adapter record: it was saved by a module without adapters (no "
            "LoRA/PrefixTuning/PromptTuning callback or PEFTMixin), so there is no adapter to load. Load it as a "
            "plain checkpoint (MyModule.load_from_checkpoint(path)) instead."
        )
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        roots = sorted({k.split(".", 1)[0] + "." for k in checkpoint["state_dict"]})
        raise ValueError(f"no adapter tensor starts with prefix {prefix!r}; the checkpoint's names start with {roots}.")
    methods = [relative_rules(m, prefix) for m in meta["methods"]]
    shapes, fingerprint = ({k[len(prefix):]: v for k, v in (meta.get(key) or {}).items() if k.startswith(prefix)}
                           for key in ("base_shapes", "base_fingerprint"))
    kept = {k: v for k, v in meta.items() if k != "tensors"}  # the names are the state's keys now
    return state, {**kept, "methods": methods, "base_shapes": shapes, "base_fingerprint": fingerprint}


def is_lightning_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a Lightning checkpoint (a file, or DeepSpeed's checkpoint directory), not an adapter
    directory."""
    if path.is_file():
        return True
    return path.is_dir() and ((path / "latest").is_file() or (path / "checkpoint").is_dir())


def base_prefix(model_names: set[str], saved_names: list[str]) -> str:
    """The attribute path (``"model."``) under which ``model_names`` appear among ``saved_names``, or ``""``.

    A checkpoint names tensors from the LightningModule; the model a user loads it into may be that module or a
    module inside it (``lit.model``). The prefix chosen is the one that makes the most names line up.

    Example:
        >>> base_prefix({"0.weight", "0.bias"}, ["model.0.weight", "model.0.bias", "head.weight"])
        'model.'
    """
    if not model_names:
        return ""
    first = min(model_names)
    candidates = {name[: -len(first)] for name in saved_names
                  if name == first or name.endswith("." + first)}

    def fit(prefix: str) -> tuple[int, int]:
        inside = {name[len(prefix):] for name in saved_names if name.startswith(prefix)}
        return len(inside & model_names), -len(prefix)

    return max(candidates or {""}, key=fit)


def adapter_of_checkpoint(
    checkpoint: dict[str, Any], model_names: set[str], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors and metadata of a read Lightning ``checkpoint``, named as in the model whose base tensor
    names are ``model_names`` (the LightningModule that was trained, or the module inside it).

    Raises:
        AdapterStateError: The checkpoint holds no lightning_peft record (it was saved without adapters); the
            message starts with ``source``.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    saved = list(meta.get("base_shapes") or {}) if isinstance(meta, dict) else []
    try:
        return adapter_from_checkpoint(checkpoint, base_prefix(model_names, saved))
    except AdapterStateError as error:
        raise AdapterStateError(f"{source}: {error}") from None

"""Export the adapter of a Lightning checkpoint without building a Trainer: ``lightning-peft-export``.

::

    lightning-peft-export CKPT OUT_DIR [--format native|peft] [--base HF_PATH] [--prefix model.]
    python -m lightning_peft.adapter_files.export CKPT OUT_DIR ...

``CKPT`` is a ``.ckpt`` file, or the directory that Lightning's ``DeepSpeedStrategy`` writes in its place (ZeRO
stage 1, 2 or 3; see :func:`read_deepspeed_checkpoint`).

The checkpoint is read with ``torch.load(weights_only=True)``, so it never executes code: a checkpoint that pickled
other objects (custom classes in ``hyper_parameters``) is refused with the names of those classes, and
``--allow-global module.Class`` trusts them explicitly. Adapter tensors are in ``checkpoint["state_dict"]`` under the
LightningModule's attribute names; ``--prefix model.`` strips the path to the base model's root (the module that
``save_adapter``/PEFT see), and drops everything outside it. The methods and base shapes come from
``checkpoint["lightning_peft"]``.

* ``--format native`` (default) needs no model: tensors and metadata are written as :func:`save_adapter` does.
* ``--format peft`` needs the base model (``--base``: a transformers directory or hub name, read with
  ``from_pretrained``): it is injected, the tensors are loaded, and :func:`save_adapter` writes PEFT's layout
  (refusing what PEFT cannot express).
"""

from __future__ import annotations

import argparse
import importlib
import math
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from lightning_peft.adapter_files.constants import CHECKPOINT_KEY
from lightning_peft.adapter_files.dispatch import save_adapter
from lightning_peft.adapter_files.native import write_adapter_directory
from lightning_peft.injection import inject
from lightning_peft.methods import Method, MethodConfig
from lightning_peft.state import load_adapter_state_dict, relative_rules

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
        ValueError: The checkpoint has no lightning_peft metadata, or nothing under ``prefix``.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise ValueError(
            "the checkpoint has no 'lightning_peft' entry: it was not saved by a module with lightning_peft adapters "
            "(LoRA/PrefixTuning/PromptTuning callbacks or PEFTMixin)."
        )
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        roots = sorted({k.split(".", 1)[0] + "." for k in checkpoint["state_dict"]})
        raise ValueError(f"no adapter tensor starts with prefix {prefix!r}; the checkpoint's names start with {roots}.")
    methods = [relative_rules(m, prefix) for m in meta["methods"]]
    shapes = {k[len(prefix):]: v for k, v in meta["base_shapes"].items() if k.startswith(prefix)}
    kept = {k: v for k, v in meta.items() if k != "tensors"}  # the names are the state's keys now
    return state, {**kept, "methods": methods, "base_shapes": shapes}


def export(checkpoint_path: str | Path, out_dir: str | Path, format: Literal["native", "peft"] = "native",
           base: str | None = None, prefix: str = "", allow_globals: list[str] | None = None) -> Path:
    """Write the adapter of a Lightning checkpoint as an adapter directory; returns it.

    Args:
        checkpoint_path: A ``.ckpt`` file saved with lightning_peft adapters.
        out_dir: Directory to write (created).
        format: ``"native"`` (safetensors + our JSON) or ``"peft"`` (Hugging Face PEFT's layout; needs ``base``).
        base: A transformers model directory or name, for ``format="peft"``.
        prefix: The LightningModule attribute path of the base model (``"model."``), stripped from names.
        allow_globals: Classes to trust when unpickling, ``"module.Class"`` each.
    """
    state, meta = adapter_from_checkpoint(read_checkpoint(checkpoint_path, allow_globals), prefix)
    if format == "native" and base is None:
        return write_adapter_directory(Path(out_dir), state, meta)
    if base is None:
        raise ValueError(
            "--format peft needs the base model (--base PATH_OR_NAME): PEFT's layout depends on the layer types and "
            "the model config, which a checkpoint does not hold."
        )
    methods = [cast(Method, MethodConfig.from_dict(m)) for m in meta["methods"]]  # registered configs
    model = inject(load_base(base), *methods)
    load_adapter_state_dict(model, state)
    return save_adapter(model, out_dir, format=format)


def load_base(name_or_path: str) -> nn.Module:
    """A transformers model from a directory or hub name, with the class its config names (``AutoModel`` else)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, architecture, None) if architecture else None
    return (cls or transformers.AutoModel).from_pretrained(name_or_path).eval()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``lightning-peft-export --help``)."""
    parser = argparse.ArgumentParser(prog="lightning-peft-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint",
                        help="Lightning checkpoint (.ckpt, or DeepSpeed's directory) holding lightning_peft adapters")
    parser.add_argument("out_dir", help="adapter directory to write")
    parser.add_argument("--format", choices=["native", "peft"], default="native")
    parser.add_argument("--base", default=None, help="transformers base model (directory or name); 'none' for none")
    parser.add_argument("--prefix", default="",
                        help="attribute path of the base model in the LightningModule, e.g. 'model.'")
    parser.add_argument("--allow-global", action="append", default=[], dest="allow_globals", metavar="MODULE.CLASS",
                        help="trust this pickled class when loading the checkpoint (repeatable)")
    args = parser.parse_args(argv)
    base = None if args.base in (None, "none", "None") else args.base
    try:
        out = export(args.checkpoint, args.out_dir, args.format, base, args.prefix, args.allow_globals)
    except (ValueError, FileNotFoundError) as err:
        print(f"lightning-peft-export: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

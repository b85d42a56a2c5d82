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
import sys
from pathlib import Path
from typing import Literal, cast

from torch import nn

from lightning_peft.adapter_files.checkpoint import adapter_from_checkpoint, read_checkpoint
from lightning_peft.adapter_files.dispatch import save_adapter
from lightning_peft.adapter_files.native import write_adapter_directory
from lightning_peft.injection import inject
from lightning_peft.methods import Method, MethodConfig
from lightning_peft.state import load_adapter_state_dict


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

"""Deploy a LoRA finetune: a small adapter file, or merged weights that load without lightning_peft.

Trains LoRA on the real MiniLM (the docstring-topic task of ``text_minilm.py``) for a short while, then shows
the two ways to ship it:

1. **Adapter only** (``save_adapter``): a few hundred KB of safetensors + JSON next to the base model you
   already have; ``load_adapter`` on a fresh base model gives the same logits.
2. **Merged** (``merge_and_unload``): LoRA folded into the query/value weights, adapters removed. The result is
   a plain ``BertForSequenceClassification``: ``save_pretrained`` writes a normal Hugging Face folder, and a
   fresh Python process that cannot import lightning_peft loads it with ``AutoModelForSequenceClassification``
   and reproduces the logits (checked here in a subprocess that blocks the import). For a plain torch model,
   ``torch.save(merged.state_dict(), path)`` into the original architecture works the same way.

Run ``python examples/merge_export.py [--out DIR]`` (about 1 minute on 2 CPU cores) or ``--quick`` (about 30 s).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import LitClassifier, docstring_topics, fit_classifier
from text_minilm import SequenceClassifier, encode, load_classifier, minilm_path
from torch.utils.data import DataLoader

from lightning_peft import LoRA, load_adapter, merge_and_unload, save_adapter, trainable_summary

# Runs in a fresh interpreter where `import lightning_peft` fails: only transformers and torch are used.
RELOAD = """
import sys
sys.modules["lightning_peft"] = None  # any import of lightning_peft now raises ImportError
import torch
from transformers import AutoModelForSequenceClassification
folder = sys.argv[1]
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
inputs = torch.load(folder + "/check_inputs.pt")
with torch.no_grad():
    logits = model(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).logits
diff = (logits - torch.load(folder + "/check_logits.pt")).abs().max().item()
print(f"reloaded {type(model).__name__} without lightning_peft: max |logit difference| {diff:.2e}")
sys.exit(0 if diff < 1e-4 else 1)
"""


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 training steps")
    parser.add_argument("--out", type=Path, default=None, help="where to write the adapter and merged model (temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        export(args.out, args.quick)
    else:
        with tempfile.TemporaryDirectory() as folder:  # about 100 MB, removed afterwards
            export(Path(folder), args.quick)


def export(out: Path, quick: bool) -> None:
    """Train LoRA briefly, then save and reload it both ways under ``out``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_pairs, test_pairs, classes = docstring_topics(seed=0)
    train, test = encode(tokenizer, train_pairs), encode(tokenizer, test_pairs[:64])
    lora = LoRA(r=8, alpha=16, target_modules=["query", "value"], trainable_modules=["classifier"])
    module, seconds = fit_classifier(SequenceClassifier(load_classifier(len(classes), seed=0)), train, epochs=3,
                                     lr=2e-3, batch_size=16, callbacks=[lora], max_steps=3 if quick else -1)
    print(f"trained LoRA in {seconds:.0f} s: {trainable_summary(module)}")
    inputs = next(iter(DataLoader(test, batch_size=64)))[0]
    module.eval()
    with torch.no_grad():
        adapted_logits = module(inputs)

    # 1. adapter only: save, then load into a fresh copy of the base model (a differently initialised head too)
    adapter_dir = save_adapter(module, out / "adapter")
    fresh = LitClassifier(SequenceClassifier(load_classifier(len(classes), seed=1)))
    load_adapter(fresh, adapter_dir)  # injects LoRA as saved, then loads its tensors
    with torch.no_grad():
        diff = (fresh.eval()(inputs) - adapted_logits).abs().max().item()
    print(f"adapter folder {directory_size(adapter_dir) / 1e3:.0f} KB; reloaded into a fresh base: max |diff| {diff:.2e}")

    # 2. merged: fold LoRA into the weights; no lightning_peft module is left in the model
    merged = merge_and_unload(module.net.model)
    leftovers = sorted({type(m).__module__ for m in merged.modules() if type(m).__module__.startswith("lightning_peft")})
    with torch.no_grad():
        diff = (merged(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).logits - adapted_logits).abs().max().item()
    print(f"merged into {type(merged).__name__} (lightning_peft modules left: {leftovers or 'none'}): "
          f"max |diff| to the adapted model {diff:.2e}")
    merged_dir = out / "merged"
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    torch.save(inputs, merged_dir / "check_inputs.pt")
    torch.save(adapted_logits, merged_dir / "check_logits.pt")
    print(f"saved with save_pretrained to {merged_dir} ({directory_size(merged_dir) / 1e6:.0f} MB)")
    run = subprocess.run([sys.executable, "-c", RELOAD, str(merged_dir)], capture_output=True, text=True)
    print(run.stdout.strip() or run.stderr[-2000:])
    if run.returncode != 0:
        raise SystemExit(f"the merged model did not reload to the same logits (exit code {run.returncode})")


if __name__ == "__main__":
    main()

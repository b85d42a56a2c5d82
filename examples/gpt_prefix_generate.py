"""Prefix tuning a GPT-2-style causal LM, then ``generate()`` with the learned prefix.

Model: ``GPT2LMHeadModel`` from a small config (2 layers, width 64, 4 heads, 16-token vocabulary), random weights.

Task: digit sequences with a rule. Pretraining teaches four rules, each shown by an instruction token
(``<+1> 3 4 5 6 …``, ``<+2> 3 5 7 9 …``, ``<+3>``, ``<-1> 3 2 1 0 9 …``, all mod 10), and half of the sequences
come without their instruction token, so the model learns to read the rule off the first digits too. Given
only ``<bos> 7`` the pretrained model must guess the rule: it continues with whatever rule it finds likely.

Prefix tuning then learns a *soft instruction*: ``PrefixTuning(num_tokens=4)`` trains 4 keys and values per
layer (2 x 2 x 4 x 64 = 1,024 numbers) on sequences that count down, without any instruction token. The frozen
model with the prefix counts down from a single start digit. The measure is exact generation: greedy
``generate()`` from ``<bos> d`` for every start digit ``d``, correct when all generated digits follow the rule.

Run ``python examples/gpt_prefix_generate.py`` (about 1 minute on 2 CPU cores) or ``--quick`` (about 15 s).
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import quiet_lightning  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_peft import PrefixTuning, trainable_summary  # noqa: E402

RULES = {"<+1>": 1, "<+2>": 2, "<+3>": 3, "<-1>": -1}
BOS, PAD = 10, 11
RULE_TOKEN = {name: 12 + i for i, name in enumerate(RULES)}  # tokens 12-15
DIGITS = 10  # digits generated after the start digit


def sequence(start: int, step: int, rule_token: int | None) -> list[int]:
    """``<bos> [rule] start, start+step, ...`` (mod 10), ``DIGITS + 1`` digits."""
    digits = [(start + i * step) % 10 for i in range(DIGITS + 1)]
    return [BOS, *([rule_token] if rule_token is not None else []), *digits]


def pretraining_data(n: int, seed: int) -> TensorDataset:
    """``n`` sequences of the four rules; half carry their rule token, half are padded at the end instead."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        name = list(RULES)[int(torch.randint(len(RULES), (1,), generator=g))]
        start = int(torch.randint(10, (1,), generator=g))
        with_token = bool(torch.randint(2, (1,), generator=g))
        row = sequence(start, RULES[name], RULE_TOKEN[name] if with_token else None)
        rows.append(row + [PAD] * (DIGITS + 3 - len(row)))
    return TensorDataset(torch.tensor(rows))


def countdown_data(repeats: int) -> TensorDataset:
    """Sequences that count down, without a rule token: the behaviour the prefix must learn to ask for."""
    return TensorDataset(torch.tensor([sequence(start, -1, None) for start in range(10)] * repeats))


class CausalLM(L.LightningModule):
    """Next-token loss on every non-pad position of a transformers causal LM."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        labels = ids.masked_fill(ids == PAD, -100)
        return self.model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def train(module: CausalLM, data: TensorDataset, steps: int, callbacks: list | None = None) -> None:
    quiet_lightning()
    L.seed_everything(0, verbose=False)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, callbacks=callbacks or [],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)


@torch.no_grad()
def countdown_accuracy(model: nn.Module, show: int = 0) -> float:
    """Share of start digits from which greedy ``generate()`` counts down correctly for ``DIGITS`` steps."""
    from torchmetrics.aggregation import MeanMetric

    model.eval()
    prompts = torch.tensor([[BOS, start] for start in range(10)])
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=DIGITS,
                         do_sample=False, pad_token_id=PAD)
    expected = torch.tensor([sequence(start, -1, None) for start in range(10)])
    correct = MeanMetric()
    correct.update((out == expected).all(dim=1).float())
    for row in out[:show]:
        print("   ", " ".join(str(t) for t in row[1:].tolist()))
    return float(correct.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps, less accurate")
    args = parser.parse_args()
    pretrain_steps, prefix_steps = (150, 60) if args.quick else (1500, 300)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=16, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=BOS,
                        eos_token_id=PAD, pad_token_id=PAD)
    base = CausalLM(GPT2LMHeadModel(config), lr=3e-3)
    train(base, pretraining_data(4000, seed=0), pretrain_steps)
    print(f"pretrained on 4 rules for {pretrain_steps} steps; from '<bos> d' the frozen model continues:")
    base_acc = countdown_accuracy(base.model, show=3)

    tuned = CausalLM(copy.deepcopy(base.model), lr=3e-2)
    train(tuned, countdown_data(repeats=20), prefix_steps, callbacks=[PrefixTuning(num_tokens=4)])
    counts = trainable_summary(tuned.model)
    print(f"after prefix tuning ({counts.trainable:,} trainable of {counts.total:,} parameters):")
    tuned_acc = countdown_accuracy(tuned.model, show=3)
    print(f"\ncounting down from a single digit, exact over {DIGITS} generated digits:\n"
          f"  pretrained model: {base_acc:.2f}\n  with the prefix:  {tuned_acc:.2f}")


if __name__ == "__main__":
    main()

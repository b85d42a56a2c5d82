"""Raw FSDP1 (FullyShardedDataParallel + fsdp_auto_wrap_policy) on 2 CPU processes (gloo), every method with a
``trainable_modules`` entry, in one launch.

Lightning's FSDPStrategy refuses CPU, so this drives torch's FSDP1 directly with the policy users pass to
``FSDPStrategy(auto_wrap_policy=...)``. Rank r trains one epoch on samples r, r+2, ... in batches of 4 (4 SGD
steps, each on the samples one process sees with batches of 8). Inside ``summon_full_params`` rank 0 writes the
trainable tensors to ``OUT/<method>.pt`` and saves the adapter with ``save_adapter`` to ``OUT/<method>-adapter``.
Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp1_peft.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from strategy_models import METHODS, TRAINABLE, end_process, tiny_gpt2, token_data
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from lightning_peft import adapter_state_dict, fsdp_auto_wrap_policy, inject, save_adapter


def train(out: Path, method: str) -> None:
    rank = dist.get_rank()
    model = inject(tiny_gpt2(), METHODS[method](trainable_modules=TRAINABLE))
    # token prompts live in the root unit beside frozen embeddings: FSDP1 needs use_orig_params for that
    fsdp = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(GPT2Block), device_id=torch.device("cpu"),
                use_orig_params=method == "prompt")
    optimizer = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=0.05)
    for batch in token_data()[rank::2].split(4):
        fsdp(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with FSDP.summon_full_params(fsdp):
        if rank == 0:
            torch.save({k: v.clone() for k, v in adapter_state_dict(model).items()}, out / f"{method}.pt")
            save_adapter(model, out / f"{method}-adapter")


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    for method in sorted(METHODS):
        train(out, method)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process()

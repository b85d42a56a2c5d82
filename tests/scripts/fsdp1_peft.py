"""Raw FSDP1 (FullyShardedDataParallel + fsdp_auto_wrap_policy) with one method on 2 CPU processes (gloo).

Lightning's FSDPStrategy refuses CPU, so this drives torch's FSDP1 directly with the policy users pass to
``FSDPStrategy(auto_wrap_policy=...)``. Each rank trains on every other sample; rank 0 saves the gathered
adapter tensors. Run: ``python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp1_peft.py OUT METHOD``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from strategy_models import end_process, tiny_gpt2, token_data
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from lightning_peft import adapter_state_dict, fsdp_auto_wrap_policy, inject


def main(out: Path, method: str) -> None:
    from test_strategies import METHODS

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = inject(tiny_gpt2(), METHODS[method]())
    # token prompts live in the root unit beside frozen embeddings: FSDP1 needs use_orig_params for that
    fsdp = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(GPT2Block), device_id=torch.device("cpu"),
                use_orig_params=method == "prompt")
    optimizer = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=0.05)
    tokens = token_data()[rank::2]
    for step in range(3):
        batch = tokens[step * 4 : (step + 1) * 4]
        fsdp(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with FSDP.summon_full_params(fsdp):
        state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    if rank == 0:
        torch.save(state, out / f"fsdp1-{method}.pt")
    end_process()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

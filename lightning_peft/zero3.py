"""DeepSpeed ZeRO-3 partitioned parameters: their full shapes, and gathering them where adapters read or write them.

ZeRO-3 keeps a slice of each parameter per rank (locally an empty tensor) and gathers it only inside the forward
of the module that owns it. Injecting inside ``deepspeed.zero.Init`` (a model built in ``configure_model`` under
Lightning's ``DeepSpeedStrategy(stage=3)``) and saving or loading adapter state under ZeRO-3 read such
parameters outside any forward: these helpers make that work, and import DeepSpeed only when a partitioned
parameter is present.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter, partitioned across ranks."""
    return hasattr(tensor, "ds_id")


def global_shape(tensor: torch.Tensor) -> torch.Size:
    """The full shape of ``tensor``: a ZeRO-3 parameter records it in ``ds_shape`` (its local data is empty)."""
    shape = getattr(tensor, "ds_shape", None)
    return torch.Size(shape) if shape is not None else tensor.shape


@contextmanager
def gathered(tensors: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[bool]:
    """Make ZeRO-3 partitioned ``tensors`` whole for the block; yields whether any was partitioned.

    A collective when it gathers: every rank must enter it. With ``modifier_rank=r``, what rank ``r`` writes into
    the tensors is scattered back to every rank's partition on exit; with ``None``, writes are discarded, and a
    tensor ZeRO-3 holds whole at the moment (inside its module's forward) is read as it is (gathering it again
    would release it under the module that uses it). Tensors that are not partitioned are left alone, so outside
    ZeRO-3 this is a no-op.
    """
    partitioned = [t for t in tensors if is_partitioned(t) and (modifier_rank is not None or not _whole_now(t))]
    if not partitioned:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield True


def _whole_now(tensor: torch.Tensor) -> bool:
    """Whether ZeRO-3 holds the partitioned ``tensor`` whole at the moment (inside its module's forward)."""
    return getattr(getattr(tensor, "ds_status", None), "name", None) == "AVAILABLE"


def is_nonzero_rank() -> bool:
    """Whether this process is a distributed rank other than 0 (after a collective gather, rank 0 writes files)."""
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0

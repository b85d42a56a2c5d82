"""Lightning glue for strategies: FSDP2's ``fully_shard``, FSDP1's flat parameters, DeepSpeed's own checkpoints and
distributed checkpoints that hold adapter tensors only."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_peft.adapter import Adapter
from lightning_peft.distributed import restore_fsdp1_parameters
from lightning_peft.errors import AdapterStateError
from lightning_peft.glue.hooks import run_inside
from lightning_peft.tensors import adapter_name_test


def refuse_sharded_module(pl_module: pl.LightningModule) -> None:
    """Adapters injected after FSDP2's ``fully_shard`` would be plain tensors FSDP never reduces: every rank would
    train its own adapters on its own data. Refused, with the fix."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [name or "<root>" for name, m in pl_module.named_modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise ValueError(
            f"lightning_peft cannot inject into {type(pl_module).__name__}: fully_shard already sharded "
            f"{', '.join(sharded[:3])}{' ...' if len(sharded) > 3 else ''}, so the adapters would be plain tensors "
            "that FSDP2 never synchronizes (each rank would train its own). Inject before sharding: in "
            "configure_model, call fully_shard by its name from torch.distributed.fsdp in the module's own code (the "
            "plugin injects on its first call), or use PEFTMixin and call self.apply_peft() before fully_shard."
        )


@contextlib.contextmanager
def inject_before_fully_shard(pl_module: pl.LightningModule, inject_now: Callable[[], None]) -> Iterator[None]:
    """While ``configure_model`` runs, FSDP2's ``fully_shard`` first runs ``inject_now()``, so the adapters exist
    before the first module is sharded (a configure_model may build its layers and shard them in one method).

    ``fully_shard`` is replaced where a user's code finds it: ``torch.distributed.fsdp``,
    ``torch.distributed._composable.fsdp``, and the globals of the module's ``configure_model`` functions (a name
    bound by ``from torch.distributed.fsdp import fully_shard``). A call the plugin cannot see (a helper in another
    file) shards first; injecting afterwards is then refused by :func:`refuse_sharded_module`, with the fix.
    """
    if not torch.distributed.is_available():
        yield
        return
    import torch.distributed._composable.fsdp as composable_fsdp
    import torch.distributed.fsdp as torch_fsdp

    original = torch_fsdp.fully_shard
    injected = False

    @functools.wraps(original)
    def fully_shard(*args: Any, **kwargs: Any) -> Any:
        nonlocal injected
        if not injected:  # once: configure_model calls fully_shard per block, the adapters exist after the first
            inject_now()
            injected = True
        return original(*args, **kwargs)

    namespaces = [vars(torch_fsdp), vars(composable_fsdp)]
    for cls in type(pl_module).__mro__:
        function = inspect.unwrap(cls.__dict__["configure_model"]) if "configure_model" in cls.__dict__ else None
        if inspect.isfunction(function) and all(function.__globals__ is not n for n in namespaces):
            namespaces.append(function.__globals__)
    replaced = [(namespace, key) for namespace in namespaces for key, value in namespace.items() if value is original]
    for namespace, key in replaced:
        namespace[key] = fully_shard
    try:
        yield
    finally:
        for namespace, key in replaced:
            namespace[key] = original


def check_fsdp1_flat_parameters(strategy: Any, pl_module: pl.LightningModule) -> None:
    """Settings of Lightning's ``FSDPStrategy`` with ``use_orig_params=False`` that would fail later: refused or
    warned about now, with the fix."""
    if not isinstance(strategy, _fsdp_strategy_classes()) or cast(Any, strategy).kwargs.get("use_orig_params", True):
        return
    hooked = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, Adapter) and not m.fsdp_unit})
    if hooked:
        raise ValueError(
            f"FSDPStrategy(use_orig_params=False) cannot shard {', '.join(hooked)}: its tensors are read by a hook "
            "on the model, outside a wrap unit of their own, so they share a unit with frozen weights, which FSDP1 "
            "refuses without use_orig_params. Use FSDPStrategy(use_orig_params=True) (Lightning's default) or "
            "ModelParallelStrategy (FSDP2)."
        )
    if getattr(strategy, "_state_dict_type", None) == "full":
        rank_zero_warn(
            "lightning_peft: Lightning's FSDPStrategy(state_dict_type='full', use_orig_params=False) fails to save "
            "the optimizer state of any model whose wrap units hold several tensors (torch's "
            "rekey_optim_state_dict: 'Each parameter should only map to one parameter name'). Keep "
            "use_orig_params=True (Lightning's default) or save with state_dict_type='sharded'."
        )


@functools.cache
def _fsdp_strategy_classes() -> tuple[type, ...]:
    """Lightning's ``FSDPStrategy`` under both of its package names (see ``glue.prepare.callback_bases``)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if importlib.util.find_spec("pytorch_lightning") is None:
        return (FSDPStrategy,)
    import pytorch_lightning

    return (FSDPStrategy, pytorch_lightning.strategies.FSDPStrategy)


def prepare_strategy(strategy: Any) -> None:
    """Make a strategy's own checkpointing adapter-only: DeepSpeed saves what trains, sharded restores skip the rest."""
    if strategy is None:
        return
    if hasattr(strategy, "exclude_frozen_parameters"):
        # DeepSpeed writes module weights itself (our on_save_checkpoint step never sees them): only what trains
        strategy.exclude_frozen_parameters = True
    run_inside(strategy, "load_checkpoint", _partial_sharded_load)


def restore_fsdp1_after_backward(pl_module: pl.LightningModule) -> None:
    """After each backward under FSDP1: see :func:`~lightning_peft.distributed.restore_fsdp1_parameters` (frozen
    ``NO_SHARD`` units would otherwise break the next forward of tied weights, and every state dict).

    Runs every step, so other strategies return before walking the modules."""
    strategy = getattr(getattr(pl_module, "_trainer", None), "strategy", None)
    model = getattr(strategy, "model", None) if isinstance(strategy, _fsdp_strategy_classes()) else None
    if model is not None:  # the wrapped root, or the module itself when configure_model wrapped its layers
        restore_fsdp1_parameters(model)


@contextlib.contextmanager
def _partial_sharded_load(strategy: Any) -> Iterator[None]:
    """During a strategy's restore, ``torch.distributed.checkpoint.load`` may skip the frozen tensors a checkpoint
    does not hold, but not adapter tensors.

    A sharded (distributed) checkpoint of an adapted model holds the adapter tensors only. Lightning's FSDP and
    ModelParallel strategies request every module tensor from it with DCP's default planner, which refuses missing
    ones whatever ``strict_loading`` says; with this planner the frozen base weights keep their values, and a
    checkpoint without the model's adapter tensors raises :class:`AdapterStateError`.
    """
    if not torch.distributed.is_available():
        yield
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    original = dcp.load
    is_adapter_tensor = adapter_name_test(strategy.lightning_module)

    def partial_load(state_dict: dict[str, Any], *rest: Any, planner: Any = None, **options: Any) -> Any:
        planner = planner if planner is not None else _adapter_load_planner(is_adapter_tensor)
        try:
            return original(state_dict, *rest, planner=planner, **options)
        except CheckpointException as error:  # a BaseException holding every rank's error: raise ours plainly
            ours = [failure for failure, _ in error.failures.values() if isinstance(failure, AdapterStateError)]
            if ours:
                raise ours[0] from None
            raise

    dcp.load = partial_load
    try:
        yield
    finally:
        dcp.load = original


def _module_tensor_name(key: str) -> str | None:
    """The module tensor a flattened distributed-checkpoint key names: Lightning stores the module state under
    ``"model"`` (FSDPStrategy) or ``"state_dict"`` (ModelParallelStrategy); other keys are optimizer state."""
    top, _, name = key.partition(".")
    return name if top in ("model", "state_dict") else None


def _adapter_load_planner(is_adapter_tensor: Callable[[str], bool]) -> Any:
    """A DCP load planner that skips module tensors the checkpoint lacks (frozen base weights of an adapter-only
    checkpoint) but refuses a checkpoint without the adapter tensors, which would otherwise keep their init."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def create_local_plan(self) -> Any:
            saved = self.metadata.state_dict_metadata if self.metadata is not None else {}
            missing = [name for key in self.state_dict if key not in saved
                       and (name := _module_tensor_name(key)) is not None and is_adapter_tensor(name)]
            if missing:
                raise AdapterStateError(
                    f"the distributed checkpoint lacks {len(missing)} adapter tensors ({', '.join(missing[:4])}): "
                    "it was saved without them or for other adapters. Inject the methods it was saved with, or "
                    "resume from a checkpoint written with these adapters."
                )
            return super().create_local_plan()

    return Planner(allow_partial_load=True)



def is_fsdp1_wrapped(module: torch.nn.Module) -> bool:
    """Whether FSDP1 wrapped ``module`` or one of its submodules (its flat shards hold no global shapes)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


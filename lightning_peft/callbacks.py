"""Lightning glue: method callbacks that inject adapters before the strategy wraps the model.

``Callback.setup`` runs before ``configure_model``; when the LightningModule builds its layers there, the
callback injects right after it instead. Either way the adapters exist before DDP/FSDP/DeepSpeed and the
optimizer capture the parameters. Checkpoints then hold adapter tensors only (also with
``ModelCheckpoint(save_weights_only=True)``, which skips callback hooks: the module's own hook does it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.overrides import is_overridden
from typing_extensions import override

from lightning_peft.adapter import Adapter
from lightning_peft.adapter_files.native import checkpoint_metadata
from lightning_peft.distributed import restore_fsdp1_parameters
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import applied_methods, inject
from lightning_peft.lora import LoRAConfig
from lightning_peft.methods import Method
from lightning_peft.operations import trainable_summary
from lightning_peft.prefix import PrefixTuningConfig
from lightning_peft.prompt import PromptTuningConfig
from lightning_peft.state import check_adapter_state, check_base_shapes
from lightning_peft.tensors import adapter_name_test, adapter_tensors, clean_name
from lightning_peft.zero3 import is_partitioned

CHECKPOINT_KEY = "lightning_peft"
_PENDING = "_peft_pending"  # attribute on a LightningModule: methods to inject right after its configure_model


def same_method(a: Method, b: Method) -> bool:
    """Whether two method objects describe the same adapters (the same object, or equal configurations)."""
    return a is b or a.to_dict() == b.to_dict()


def prepare_module(pl_module: pl.LightningModule, methods: list[Method]) -> None:
    """Inject ``methods`` into a LightningModule and make its checkpoints adapter-only.

    Idempotent per method: a method equal to one already injected (same configuration, also after the module
    was deep-copied or pickled) is skipped, so repeated ``fit``/``test`` calls and a callback next to a mixin
    that asks for the same method never adapt a layer twice.
    """
    todo: list[Method] = []
    for method in methods:
        if not any(same_method(method, done) for done in [*applied_methods(pl_module), *todo]):
            todo.append(method)
    strategy = getattr(getattr(pl_module, "_trainer", None), "strategy", None)
    if methods:  # also on a later fit, whose new Trainer brings a new strategy
        _prepare_strategy(strategy)
    if todo:
        _refuse_sharded_module(pl_module)
        inject(pl_module, *todo)
        pl_module.strict_loading = False  # checkpoints hold adapter tensors only; check_checkpoint checks them
        names = ", ".join(type(m).__name__ for m in todo)
        rank_zero_info(f"lightning_peft: {names} injected; {trainable_summary(pl_module)}")
    if methods:
        _check_fsdp1_flat_parameters(strategy, pl_module)


def _refuse_sharded_module(pl_module: pl.LightningModule) -> None:
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
    file) shards first; injecting afterwards is then refused by :func:`prepare_module`, with the fix.
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


def _check_fsdp1_flat_parameters(strategy: Any, pl_module: pl.LightningModule) -> None:
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
    """Lightning's ``FSDPStrategy`` under both of its package names (see :func:`_callback_bases`)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if importlib.util.find_spec("pytorch_lightning") is None:
        return (FSDPStrategy,)
    import pytorch_lightning

    return (FSDPStrategy, pytorch_lightning.strategies.FSDPStrategy)


def _prepare_strategy(strategy: Any) -> None:
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


def keep_adapter_tensors(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Drop frozen base weights from a Lightning checkpoint and record the methods and base shapes."""
    if not applied_methods(pl_module):
        return
    is_adapter_tensor = adapter_name_test(pl_module)  # by name: FSDP1's flat parameters hide the tensors
    # FSDP's gathered state dict has the global shapes; ZeRO-3's holds empty partitions, its parameters know them
    zero3 = any(is_partitioned(p) for p in pl_module.parameters())
    checkpoint[CHECKPOINT_KEY] = checkpoint_metadata(pl_module, None if zero3 else checkpoint["state_dict"])
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_tensor(k)}
    # their names: strategies that load the weights before on_load_checkpoint (FSDP, ModelParallel, DeepSpeed)
    # pass no state_dict to check_checkpoint, which then compares these with the model's adapter tensors
    checkpoint[CHECKPOINT_KEY]["tensors"] = sorted(clean_name(k) for k in checkpoint["state_dict"])


def check_checkpoint(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint made for another base model or missing adapter tensors; warn on a plain one.

    Outside a Trainer (``LightningModule.load_from_checkpoint``, which loads strictly) the checkpoint's state
    is completed with the module's own frozen base tensors, so exactly the adapter tensors change.
    """
    if not applied_methods(pl_module):
        return
    meta = checkpoint.get(CHECKPOINT_KEY)
    trainer = getattr(pl_module, "_trainer", None)
    if meta is None and trainer is not None and trainer.state.fn == "fit" and checkpoint.get("optimizer_states"):
        raise AdapterStateError(
            "lightning_peft: fit(ckpt_path=...) resumes a checkpoint saved without lightning_peft adapters: its "
            "optimizer state is for other parameters than the adapters that train now. To start from its weights "
            "with a fresh optimizer, load them first (module.load_state_dict(torch.load(path, weights_only=True)"
            "['state_dict'], strict=False)) and call fit() without ckpt_path."
        )
    if meta is None:
        rank_zero_warn(
            "lightning_peft: the checkpoint has no adapter metadata (it was saved without lightning_peft); "
            "its base weights load, adapters keep their current values."
        )
        return
    if not _is_fsdp1_wrapped(pl_module):  # FSDP1's flat shards hold no global shapes to compare
        check_base_shapes(pl_module, meta["base_shapes"])
    now = [method.to_dict() for method in applied_methods(pl_module)]
    if meta.get("methods") != now:
        rank_zero_warn(
            f"lightning_peft: the checkpoint was saved with methods {meta.get('methods')}, the model has {now}."
        )
    if "state_dict" not in checkpoint:  # the strategy loaded the weights itself (strict=False), before this hook
        saved = meta.get("tensors")
        missing = sorted({name for name, _ in adapter_tensors(pl_module)} - set(saved or []))
        if saved and missing:  # (no names: an older checkpoint, or a ZeRO-3 one whose module state was empty)
            raise AdapterStateError(
                f"the checkpoint lacks {len(missing)} adapter tensors of {type(pl_module).__name__} "
                f"({', '.join(missing[:4])}): it was saved for other adapters. Inject the methods it was saved with "
                f"({meta.get('methods')})."
            )
        return
    try:
        check_adapter_state(pl_module, checkpoint["state_dict"])
    except AdapterStateError as error:
        differences = _differences(meta.get("methods") or [], now)
        raise AdapterStateError(f"{error} The checkpoint was saved with {differences}." if differences else str(error)
                                ) from None
    if trainer is None:
        state = checkpoint["state_dict"]
        for name, tensor in pl_module.state_dict().items():
            state.setdefault(name, tensor)


def _differences(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """``"lora r=2 (the model has r=4)"`` for every argument that differs between saved and current methods."""
    if len(saved) != len(now):
        return f"{len(saved)} methods ({[m.get('method') for m in saved]}), the model has {len(now)}"
    return "; ".join(f"{old.get('method')} {key}={old.get(key)!r} (the model has {key}={new.get(key)!r})"
                     for old, new in zip(saved, now, strict=True) for key in new if old.get(key) != new.get(key))


def _is_fsdp1_wrapped(module: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def overrides_hook(pl_module: pl.LightningModule, hook: str) -> bool:
    """Whether the module's class defines ``hook`` beyond LightningModule's default.

    Looks the LightningModule base up in the class's MRO, so modules of ``lightning.pytorch`` and of
    ``pytorch_lightning`` both work (Lightning's own ``is_overridden`` only knows its namespace).
    """
    mro = type(pl_module).__mro__
    base = next((c for c in mro if c.__name__ == "LightningModule" and c.__module__.endswith("core.module")), None)
    return base is not None and is_overridden(hook, pl_module, parent=base)


class _Extended:
    """Instance attribute replacing a method of ``owner`` (a LightningModule hook, a strategy's method): the method
    as defined before, run inside each context, then each step.

    A context is a module-level function ``context(owner)`` returning a context manager; a step is a module-level
    function ``step(owner, *args)``. The wrapper holds the owner and the method's name, not bound methods, so
    ``copy.deepcopy`` and pickling (``ddp_spawn``) give a copy that runs on the copy. ``__wrapped__`` is the class's
    function, so Lightning's ``is_overridden`` still sees the user's code.
    """

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name
        self.contexts: list[Callable[[Any], contextlib.AbstractContextManager[Any]]] = []
        self.steps: list[Callable[..., None]] = []
        self.inner = owner.__dict__.get(name)  # an instance-level override someone set before us, if any
        functools.update_wrapper(self, getattr(type(owner), name))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        method = self.inner or getattr(type(self.owner), self.name).__get__(self.owner)
        with contextlib.ExitStack() as stack:
            for context in self.contexts:
                stack.enter_context(context(self.owner))
            result = method(*args, **kwargs)
        for step in self.steps:
            step(self.owner, *args)
        return result


def _extended(owner: Any, name: str) -> _Extended:
    current = owner.__dict__.get(name)
    if not isinstance(current, _Extended):
        current = _Extended(owner, name)
        owner.__dict__[name] = current
    return current


def run_after(module: pl.LightningModule, hook: str, step: Callable[..., None]) -> None:
    """Make ``module.<hook>(...)`` also run ``step(module, ...)`` afterwards (once, however often this is called)."""
    steps = _extended(module, hook).steps
    if step not in steps:
        steps.append(step)


def run_inside(owner: Any, name: str, context: Callable[[Any], contextlib.AbstractContextManager[Any]]) -> None:
    """Make ``owner.<name>(...)`` run inside ``context(owner)`` (once, however often this is called)."""
    contexts = _extended(owner, name).contexts
    if context not in contexts:
        contexts.append(context)


def _inject_pending(pl_module: pl.LightningModule, *_: Any) -> None:
    prepare_module(pl_module, pl_module.__dict__.pop(_PENDING, []))


def _pending_before_fully_shard(pl_module: pl.LightningModule) -> contextlib.AbstractContextManager[None]:
    return inject_before_fully_shard(pl_module, functools.partial(_inject_pending, pl_module))


def _callback_bases() -> tuple[type, ...]:
    # Lightning ships one code base under two names, lightning.pytorch and pytorch_lightning, with separate
    # classes, and each Trainer type-checks against its own (single callbacks, LightningCLI's `callbacks:`).
    # Subclassing both Callback classes makes one callback class valid for either Trainer.
    if importlib.util.find_spec("pytorch_lightning") is None:
        return (Callback,)
    import pytorch_lightning

    return (Callback, pytorch_lightning.Callback)


class _MethodCallback(*_callback_bases()):  # type: ignore[misc]
    """Shared Lightning glue of the method callbacks (``LoRA``, ``PrefixTuning``, ``PromptTuning``).

    A subclass also derives from its method's config (``class LoRA(LoRAConfig, _MethodCallback)``), which
    provides ``attach``, ``trainable_rules`` and ``to_dict``. In ``setup`` the callback injects its method, or,
    when the LightningModule builds layers in ``configure_model``, right after that hook; both are before
    ``strategy.setup`` wraps the model and the optimizer sees the parameters.
    """

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**{k: repr(v) for k, v in self.to_dict().items()})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_peft.mixin import PEFTMixin

        if not isinstance(pl_module, PEFTMixin):  # the mixin has these hooks already
            run_after(pl_module, "on_save_checkpoint", keep_adapter_tensors)
            run_after(pl_module, "on_load_checkpoint", check_checkpoint)
            run_after(pl_module, "on_after_backward", restore_fsdp1_after_backward)
        if overrides_hook(pl_module, "configure_model"):  # layers may be built there: inject right after it
            pending = pl_module.__dict__.setdefault(_PENDING, [])
            if not any(same_method(self, m) for m in pending):
                pending.append(self)
            run_inside(pl_module, "configure_model", _pending_before_fully_shard)  # FSDP2 shards after injection
            run_after(pl_module, "configure_model", _inject_pending)
        else:
            prepare_module(pl_module, [self])

    @override
    def state_dict(self) -> dict[str, Any]:
        # a record of the arguments; the key holds them all, so a resumed callback finds only a state equal to its
        # own (check_checkpoint compares the methods a checkpoint was saved with to the model's, and warns)
        return {"config": self.to_dict()}


class LoRA(LoRAConfig, _MethodCallback):
    """LoRA as a Lightning callback: freezes the model and trains low-rank updates of the selected layers.

    Takes the arguments of :class:`~lightning_peft.lora.LoRAConfig` (``r``, ``alpha``, ``dropout``,
    ``target_modules``, ``exclude_modules``, ``trainable_modules``, ...). The same object also works without a
    Trainer: ``inject(model, LoRA(r=8))``.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["query", "value"],
                                            trainable_modules=["classifier"])])
    """


class PrefixTuning(PrefixTuningConfig, _MethodCallback):
    """Prefix tuning as a Lightning callback: freezes the model and trains per-layer key/value prefixes.

    Takes the arguments of :class:`~lightning_peft.prefix.PrefixTuningConfig` (``num_tokens``, ``reparameterize``,
    ``hidden_size``, ``layers``, ``gate``, ``trainable_modules``, ...). Works for transformers models (through
    their attention interface), ``nn.MultiheadAttention`` and timm ``Attention``; the same object also works
    without a Trainer: ``inject(model, PrefixTuning(num_tokens=10))``.

    Example::

        trainer = L.Trainer(callbacks=[PrefixTuning(num_tokens=20, reparameterize=True, hidden_size=512)])
    """


class PromptTuning(PromptTuningConfig, _MethodCallback):
    """Soft prompts as a Lightning callback: freezes the model and trains prompts for text, ViTs or CNNs.

    Takes the arguments of :class:`~lightning_peft.prompt.PromptTuningConfig` (``num_tokens``, ``init``,
    ``init_text``, ``tokenizer``, ``kind``, ``deep``, ``width``, ``trainable_modules``, ...). The kind is detected
    from the model when ``kind`` is omitted: token prompts for transformers language models, patch-token prompts
    (VPT) for torchvision/timm/transformers ViTs, pixel prompts for other image models. The same object also
    works without a Trainer: ``inject(model, PromptTuning(num_tokens=8))``.

    Example::

        trainer = L.Trainer(callbacks=[PromptTuning(num_tokens=20, init="text", init_text="Classify the sentiment:",
                                                    tokenizer="path/to/tokenizer")])
    """


from lightning_peft.spawn import install_spawn_recovery  # noqa: E402  (it imports this module's classes lazily)

install_spawn_recovery()

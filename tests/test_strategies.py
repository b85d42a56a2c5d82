"""Every method under Lightning's strategies and precisions on CPU: DDP (2 processes, gloo; also as 2 nodes),
FSDP1, FSDP2, DeepSpeed ZeRO-2/3, bf16, activation checkpointing, meta-device init and torch.compile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from strategy_models import CausalLM, tiny_gpt2, token_data

from lightning_peft import (
    LoRA,
    PrefixTuning,
    PromptTuning,
    adapter_state_dict,
    enable_input_grads,
    inject,
    load_adapter,
    merge,
    save_adapter,
)
from lightning_peft.adapter_files.export import export, read_checkpoint

METHODS: dict[str, Callable[..., L.Callback]] = {
    "lora": lambda **kw: LoRA(r=4, alpha=8, target_modules=["c_attn", "c_proj"], **kw),
    "prefix": lambda **kw: PrefixTuning(num_tokens=3, **kw),
    "prompt": lambda **kw: PromptTuning(num_tokens=3, init="random", **kw),
}


@pytest.fixture
def clean_env() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _run(tmp_path: Path, method: str, name: str, *, devices: int, batch_size: int, epochs: int,
         ckpt_path: str | None = None, checkpoint: bool = False, method_kwargs: dict | None = None,
         strategy: str = "ddp_spawn", **trainer_kwargs: object) -> tuple[L.Trainer, CausalLM, dict[str, torch.Tensor]]:
    """Fit a :class:`CausalLM`; returns the trainer, the module and the adapter tensors rank 0 dumped."""
    dump = tmp_path / f"{name}.pt"
    module = CausalLM(batch_size=batch_size, dump_to=str(dump))
    callbacks = [METHODS[method](**(method_kwargs or {}))]
    if checkpoint:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy if devices > 1 else "auto", max_epochs=epochs,
        callbacks=callbacks, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpoint, **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, torch.load(dump, weights_only=True)


def _fit(tmp_path: Path, method: str, name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
    return _run(tmp_path, method, name, **kwargs)[2]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook"])  # spawned workers; forked workers
@pytest.mark.parametrize("method", sorted(METHODS))
def test_spawn_and_fork_workers_match_one_process_and_the_main_process_gets_their_adapters(
    tmp_path: Path, clean_env: None, method: str, strategy: str
) -> None:
    extra = {"trainable_modules": ["ln_f"]}
    single = _fit(tmp_path, method, "single", devices=1, batch_size=8, epochs=1, method_kwargs=extra)
    trainer, module, worker = _run(tmp_path, method, "workers", devices=2, batch_size=4, epochs=1,
                                   method_kwargs=extra, strategy=strategy)
    initial = adapter_state_dict(inject(CausalLM(), METHODS[method](**extra)))
    main = adapter_state_dict(module)  # the main process's module, after fit returned
    assert main.keys() == worker.keys() == single.keys() == initial.keys()
    assert any(n.startswith("model.transformer.ln_f.") for n in single)
    assert any(not torch.equal(single[n], initial[n]) for n in single), "nothing trained"
    for name in single:
        torch.testing.assert_close(worker[name], single[name], rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(main[name], worker[name]), name
    trainer.save_checkpoint(tmp_path / "main.ckpt")  # in the main process: adapter-only, with the trained values
    saved = torch.load(tmp_path / "main.ckpt", weights_only=False)["state_dict"]
    assert saved.keys() == single.keys() and all(torch.equal(saved[n], main[n]) for n in saved)
    save_adapter(module, tmp_path / "adapter")  # and evaluation: a fresh base with it gives the main's logits
    tokens = token_data()[:2]
    fresh = load_adapter(CausalLM().eval(), tmp_path / "adapter")
    torch.testing.assert_close(fresh.model(input_ids=tokens).logits, module.eval().model(input_ids=tokens).logits,
                               rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_ddp_adapter_checkpoint_resumes_under_ddp_and_on_one_device(tmp_path: Path, clean_env: None, method: str) -> None:
    # cut at an epoch end: a run stopped by max_steps mid-loop replays its last epoch when resumed
    straight = _fit(tmp_path, method, "straight", devices=2, batch_size=4, epochs=2)
    _fit(tmp_path, method, "cut", devices=2, batch_size=4, epochs=1, checkpoint=True)
    last = tmp_path / "cut" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["state_dict"] and all(".base_layer." not in k for k in saved["state_dict"])
    assert set(saved["state_dict"]) == set(straight), "checkpoint must hold exactly the adapter tensors"
    resumed = _fit(tmp_path, method, "resumed", devices=2, batch_size=4, epochs=2, ckpt_path=str(last))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)
    on_one = _fit(tmp_path, method, "one", devices=1, batch_size=8, epochs=2, ckpt_path=str(last))
    for name in straight:
        torch.testing.assert_close(on_one[name], straight[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-true"])
def test_training_steps_in_bf16_stay_finite_and_train_adapters(tmp_path: Path, method: str, precision: str) -> None:
    trained = _fit(tmp_path, method, precision, devices=1, batch_size=16, epochs=1, precision=precision)
    initial = adapter_state_dict(inject(tiny_gpt2(), METHODS[method]()))
    assert all(torch.isfinite(t.float()).all() for t in trained.values())
    assert any(not torch.equal(trained[n].float(), initial[n.removeprefix("model.")].float()) for n in trained)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_16_mixed_trains_float32_adapters_in_float16_compute_close_to_32_bit(tmp_path: Path, method: str) -> None:
    # Lightning refuses precision="16-mixed" on CPU, yet its plugin (fp16 autocast + GradScaler) runs there as is
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    mixed = _fit(tmp_path, method, "mixed", devices=1, batch_size=8, epochs=1, plugins=[plugin])
    full = _fit(tmp_path, method, "full", devices=1, batch_size=8, epochs=1)
    assert all(t.dtype == torch.float32 for t in mixed.values()), "adapters keep fp32 master weights"
    assert plugin.scaler.get_scale() >= 2.0**16, "no step was skipped for inf/nan gradients"
    assert any(not torch.equal(mixed[n], full[n]) for n in full), "the forward did not run in float16"
    for name in full:  # unscaled gradients: the same steps up to float16 rounding
        torch.testing.assert_close(mixed[name], full[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float32_adapters_on_a_bf16_true_base_stay_float32_and_train(tmp_path: Path, method: str) -> None:
    trained = _fit(tmp_path, method, "pinned", devices=1, batch_size=16, epochs=1, precision="bf16-true",
                   method_kwargs={"adapter_dtype": "float32"})
    initial = adapter_state_dict(inject(tiny_gpt2(), METHODS[method]()))
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert any(not torch.equal(trained[n], initial[n.removeprefix("model.")]) for n in trained)


def test_pinned_adapter_dtype_survives_model_conversion() -> None:
    model = inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"], adapter_dtype="float32")).to(torch.bfloat16)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    logits = model(input_ids=token_data()[:2]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def _adapter_grads(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_activation_checkpointing_gives_adapters_the_same_gradients(method: str, reentrant: bool) -> None:
    model = inject(tiny_gpt2(), METHODS[method]())
    _randomize_adapters(model)
    tokens = token_data()[:4]
    model.train()
    plain = _adapter_grads(model, tokens)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = _adapter_grads(model, tokens)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


class _CheckpointedBlocks(torch.nn.Module):
    """A user model that checkpoints its own blocks with torch.utils.checkpoint."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(3))
        self.reentrant = reentrant

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            if self.reentrant is None:
                hidden = block(hidden)
            else:
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=self.reentrant)
        return hidden.sum()


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_in_user_code_gives_adapters_the_same_gradients(reentrant: bool) -> None:
    tokens = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in (None, reentrant):
        model = inject(_CheckpointedBlocks(mode), LoRA(r=2, target_modules="all-linear"))
        if mode:  # reentrant checkpointing needs inputs that require grad (frozen embeddings give none)
            enable_input_grads(model, "embed")
        _randomize_adapters(model)
        model(tokens).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[None].items():
        assert grads[reentrant][name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(grads[reentrant][name], grad)


def _randomize_adapters(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("method", ["lora", "prefix"])  # prompt init reads the embedding: only after weights load
def test_meta_device_injection_materializes_to_the_same_init(method: str) -> None:
    with torch.device("meta"):
        model = tiny_gpt2()
    inject(model, METHODS[method]())
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():  # what strategies do after materializing
        if callable(getattr(module, "reset_parameters", None)) and any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
    reference = inject(tiny_gpt2(), METHODS[method]())
    ours, theirs = adapter_state_dict(model), adapter_state_dict(reference)
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name])  # deterministic per-name init


@pytest.mark.parametrize("method", sorted(METHODS))
def test_torch_compile_of_adapted_model_matches_eager(method: str) -> None:
    model = inject(tiny_gpt2(), METHODS[method]())
    _randomize_adapters(model)
    model.eval()
    tokens = token_data()[:2]
    eager = model(input_ids=tokens).logits
    compiled = torch.compile(model, backend="aot_eager")(input_ids=tokens).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_fsdp1_wrap_policy_gives_adapters_and_wrapped_layers_units_of_their_own() -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from lightning_peft import fsdp_auto_wrap_policy

    model = inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"], trainable_modules=["ln_f"]))
    units = fsdp_auto_wrap_policy(GPT2Block)._run_policy(model, set(), {})
    for unit in [model, *units]:  # every unit's own tensors (outside nested units) are all trainable or all frozen
        nested = {id(p) for other in units if other is not unit and any(other is m for m in unit.modules())
                  for p in other.parameters()}
        flags = {p.requires_grad for p in unit.parameters() if id(p) not in nested}
        assert len(flags) <= 1, f"{type(unit).__name__} mixes trainable and frozen tensors"
    assert sum(isinstance(u, GPT2Block) for u in units) == 2
    assert model.transformer.ln_f in units and model.transformer.h[0].attn.c_attn.base_layer in units


def test_restore_fsdp1_parameters_mends_frozen_no_shard_units_after_backward(tmp_path: Path) -> None:
    # one process: FSDP1 uses NO_SHARD, where torch leaves an all-frozen unit (here the root around the adapter
    # units) unregistered after a backward; its weights then vanish from state_dict() and tied weights break
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from lightning_peft import fsdp_auto_wrap_policy, restore_fsdp1_parameters

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = inject(tiny_gpt2(), LoRA(r=2, target_modules=["c_attn"]))
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        fsdp = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(GPT2Block), device_id=torch.device("cpu"),
                    use_orig_params=True)
        tokens = token_data()[:4]
        fsdp(input_ids=tokens, labels=tokens).loss.backward()
        try:
            fsdp.state_dict()
            pytest.skip("this torch no longer leaves frozen NO_SHARD units unregistered after a backward")
        except AssertionError as error:  # torch's bug, shown: the frozen root unit's weights are plain tensors now
            assert "is in the state_dict" in str(error)
        assert restore_fsdp1_parameters(fsdp) >= 1
        assert restore_fsdp1_parameters(fsdp) == 0, "nothing left to mend"
        state = fsdp.state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
        fsdp(input_ids=tokens, labels=tokens).loss.backward()  # tied embedding and head: a second step runs
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_ddp_across_two_nodes_matches_one_process_with_double_batch(
    tmp_path: Path, clean_env: None, method: str
) -> None:
    # two torchrun agents, one per "node", meet on localhost as a cluster's nodes meet at MASTER_ADDR
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    port = str(_free_port())
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                          "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                          str(Path(__file__).parent / "scripts" / "multinode_ddp.py"), str(tmp_path), method],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    ranks = [torch.load(tmp_path / f"node{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks == [{"node_rank": r, "global_rank": r, "world_size": 2} for r in (0, 1)]
    multinode = torch.load(tmp_path / "multinode.pt", weights_only=True)
    single = _fit(tmp_path, method, "single", devices=1, batch_size=8, epochs=1)
    assert multinode.keys() == single.keys() and single
    for name in single:
        torch.testing.assert_close(multinode[name], single[name], rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(single), "the checkpoint must hold exactly the adapter tensors"


def _torchrun(script: str, *args: str, processes: int = 2) -> None:
    """Run ``tests/scripts/<script>`` on CPU processes with torch.distributed.run (its launcher re-runs argv)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).parent / "scripts" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _single_process_reference(
    method: str, steps: int, batch_size: int, in_module: bool = False
) -> dict[str, torch.Tensor]:
    """SGD on one process. ``in_module``: inject into a :class:`CausalLM` as a callback does (names ``model.*``,
    which seed the adapters' init), rather than into the bare model."""
    root = CausalLM() if in_module else tiny_gpt2()
    inject(root, METHODS[method]())
    model = root.model if in_module else root
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    tokens = token_data()
    for step in range(steps):
        batch = tokens[step * batch_size : (step + 1) * batch_size]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return adapter_state_dict(root)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fsdp1_with_the_wrap_policy_matches_one_process_on_cpu(tmp_path: Path, method: str) -> None:
    _torchrun("fsdp1_peft.py", str(tmp_path), method)
    sharded = torch.load(tmp_path / f"fsdp1-{method}.pt", weights_only=True)
    # rank r read samples r, r+2, ... in batches of 4: the same 8 samples per step as one process in order
    reference = _single_process_reference(method, steps=3, batch_size=8)
    assert sharded.keys() == reference.keys() and sharded
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-5, atol=1e-6)


def _one_process_trainables(
    method: str, steps: int, batch_size: int, **method_kwargs: object
) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a :class:`CausalLM` (adapters and trainable_modules) after SGD on one process."""
    root = inject(CausalLM(), METHODS[method](**method_kwargs))
    optimizer = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.05)
    tokens = token_data()
    for step in range(steps):
        batch = tokens[step * batch_size : (step + 1) * batch_size]
        root.model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in root.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_fsdp2_sharding_in_configure_model_matches_one_process_with_callback_and_mixin(tmp_path: Path) -> None:
    # one launch: every method through the callback and the mixin, neither calling apply_peft() before fully_shard
    _torchrun("fsdp2_peft.py", str(tmp_path))
    for method in sorted(METHODS):
        reference = _one_process_trainables(method, steps=4, batch_size=8, trainable_modules=["ln_f"])
        assert any(n.startswith("model.transformer.ln_f.") for n in reference)
        for glue in ("callback", "mixin"):
            report = torch.load(tmp_path / f"{method}-{glue}.pt", weights_only=True)
            assert report["trained"].keys() == reference.keys() == report["saved"].keys(), f"{method}-{glue}"
            for name, tensor in reference.items():
                for kind in ("trained", "saved"):  # after fit; in the checkpoint rank 0 wrote
                    torch.testing.assert_close(report[kind][name], tensor, rtol=1e-5, atol=1e-5,
                                               msg=f"{method}-{glue} {kind}: {name}")
    refused = torch.load(tmp_path / "refused.pt", weights_only=True)["refused"]
    assert re.match(r"lightning_peft cannot inject into HelperLM: fully_shard already sharded .*apply_peft\(\) "
                    r"before fully_shard", refused), refused


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fsdp2_adapter_only_checkpoints_full_and_sharded_resume_bitwise(tmp_path: Path, method: str) -> None:
    _torchrun("fsdp2_checkpoints.py", str(tmp_path), method)
    adapters = {f"model.{k}" for k in adapter_state_dict(inject(tiny_gpt2(), METHODS[method]()))}
    for mode in ("full", "sharded"):  # one file; a torch.distributed.checkpoint directory
        report = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        assert set(report["saved"]) == adapters == set(report["straight"]), mode
        for name, tensor in report["straight"].items():
            torch.testing.assert_close(report["resumed"][name], tensor, rtol=0, atol=0, msg=f"{mode}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "processes", "glue"),
                         [*((m, 2, "callback") for m in sorted(METHODS)), ("lora", 1, "callback"), ("lora", 1, "mixin")])
def test_lightning_fsdp1_adapter_only_checkpoints_full_and_sharded_resume_bitwise(
    tmp_path: Path, method: str, processes: int, glue: str
) -> None:
    # Lightning's FSDPStrategy itself on CPU processes (tests/scripts/fsdp1_checkpoints.py lifts its GPU checks);
    # one process is NO_SHARD, where torch leaves frozen units unregistered after a backward (the callbacks and
    # the mixin mend them; unmended, GPT-2's tied embedding fails the next forward)
    _torchrun("fsdp1_checkpoints.py", str(tmp_path), method, *(["mixin"] if glue == "mixin" else []),
              processes=processes)
    adapters = {f"model.{k}" for k in adapter_state_dict(inject(tiny_gpt2(), METHODS[method]()))}
    runs = ["full-True", "sharded-True"] + ([] if method == "prompt" else ["sharded-False"])
    for run in runs:  # sharded-False: flat parameters hide the adapter tensors from named_parameters()
        report = torch.load(tmp_path / f"{run}.pt", weights_only=True)
        assert set(report["saved"]) == adapters == set(report["straight"]), run
        for name, tensor in report["straight"].items():
            torch.testing.assert_close(report["resumed"][name], tensor, rtol=0, atol=0, msg=f"{run}: {name}")
    checks = torch.load(tmp_path / "checks.pt", weights_only=True)
    # a sharded checkpoint without this model's adapter tensors is refused, not loaded around them
    assert re.match(r"the distributed checkpoint lacks \d+ adapter tensors \(model\.transformer",
                    checks["mismatch"]["sharded"])
    assert re.match(r"the checkpoint lacks \d+ adapter tensors of MomentumLM \(model\.transformer",
                    checks["mismatch"]["full"])
    if method == "prompt":  # the prompt cannot have a unit of its own: refused at setup, with the fix
        assert "use_orig_params=True" in checks["refused"] and "TokenPrompt" in checks["refused"]
    else:  # Lightning cannot save a full checkpoint with flat parameters: warned at setup, with the fix
        assert checks["refused"] == ""
        assert any("state_dict_type='sharded'" in w for w in checks["warnings"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_deepspeed_zero_trains_like_one_process_saves_adapters_only_and_resumes(
    tmp_path: Path, method: str, stage: int
) -> None:
    # Lightning's DeepSpeedStrategy on 2 CPU processes, its CUDA-only checks lifted (tests/scripts/deepspeed_peft.py)
    _torchrun("deepspeed_peft.py", str(tmp_path), method, str(stage))

    def load(name: str) -> dict:
        return torch.load(tmp_path / f"{name}.pt", weights_only=True)

    initial = adapter_state_dict(inject(CausalLM(), METHODS[method]()))
    reference = _single_process_reference(method, steps=4, batch_size=8, in_module=True)
    one, info = load("one"), load("one-info")
    assert one.keys() == reference.keys() == initial.keys() and one
    for name, tensor in load("one-start").items():  # seeded by name: every rank starts where one process starts
        torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0)
    for name in reference:  # 2 ranks with batch 4 step like 1 process with batch 8
        torch.testing.assert_close(one[name], reference[name], rtol=1e-5, atol=1e-6)
    assert info["exclude_frozen_parameters"], "the callback makes DeepSpeed save what trains, only"
    assert info["reloaded"], "load_adapter_state_dict must write into every rank's partitions"
    if stage == 3:  # persistence threshold 0: the adapters themselves were partitioned, prompts included
        assert set(one) <= set(info["partitioned"])

    # DeepSpeed's checkpoint directory holds the trained tensors; under ZeRO-3 the exporter joins the ranks' slices
    checkpoint = read_checkpoint(tmp_path / "one" / "last.ckpt")
    assert checkpoint["state_dict"].keys() == one.keys()
    exported = export(tmp_path / "one" / "last.ckpt", tmp_path / "exported", prefix="model.")
    exported_state = adapter_state_dict(load_adapter(tiny_gpt2(), exported))
    saved_state = adapter_state_dict(load_adapter(tiny_gpt2(), tmp_path / "adapter"))  # save_adapter on every rank
    peft_state = adapter_state_dict(load_adapter(tiny_gpt2(), tmp_path / "adapter-peft"))  # format="peft", too
    for name in one:
        assert torch.equal(checkpoint["state_dict"][name], one[name]), name
        assert torch.equal(exported_state[name.removeprefix("model.")], one[name]), name
        assert torch.equal(saved_state[name.removeprefix("model.")], one[name]), name
        assert torch.equal(peft_state[name.removeprefix("model.")], one[name]), name

    straight, resumed = load("straight"), load("resumed")
    for name in straight:  # resuming from the adapter-only checkpoint continues bitwise
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)
    assert any(not torch.equal(straight[n], one[n]) for n in one), "the second epoch trained nothing"

    # built in configure_model: under ZeRO-3 inside deepspeed.zero.Init, so injected next to partitioned weights
    built, built_start, built_info = load("built"), load("built-start"), load("built-info")
    for name, tensor in built_start.items():
        if method == "prompt":  # a random prompt is a seeded normal scaled by the token embedding's std
            expected = initial[name] / info["embedding_std"] * built_info["embedding_std"]
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0)
    assert {n: t.shape for n, t in built.items()} == {n: t.shape for n, t in one.items()}
    assert all(torch.isfinite(t).all() for t in built.values())
    assert any(not torch.equal(built[n], built_start[n]) for n in built), "the configure_model run trained nothing"
    if stage == 3:
        assert set(built) <= set(built_info["partitioned"])

    # bf16-mixed: DeepSpeed names the optimizer files bf16_zero_pp_rank_*; the exporter still finds the trained
    # tensors (ZeRO-2: the bf16 module weights; ZeRO-3: the fp32 masters, which round to the bf16 weights)
    bf16 = load("bf16")
    bf16_checkpoint = read_checkpoint(tmp_path / "bf16" / "last.ckpt")["state_dict"]
    assert bf16_checkpoint.keys() == bf16.keys() == one.keys()
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    for name, tensor in bf16.items():
        assert torch.equal(bf16_checkpoint[name].to(torch.bfloat16), tensor), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_model_inside_a_lightning_module_saves_an_adapter_for_a_fresh_base(tmp_path: Path, method: str) -> None:
    module = inject(CausalLM(), METHODS[method]())  # what the callbacks do: the LightningModule is the root
    with torch.no_grad():
        for tensor in adapter_state_dict(module).values():
            tensor.add_(0.05)  # away from the identity start
    tokens = token_data()[:2]
    expected = module.model.eval()(input_ids=tokens).logits
    save_adapter(module.model, tmp_path)
    fresh = load_adapter(tiny_gpt2().eval(), tmp_path)
    torch.testing.assert_close(fresh(input_ids=tokens).logits, expected, rtol=0, atol=0)


def test_merging_zero3_partitioned_weights_is_refused_with_the_way_out() -> None:
    model = inject(tiny_gpt2(), METHODS["lora"]())
    model.transformer.wte.weight.ds_id = 0  # DeepSpeed marks every ZeRO-3 partitioned parameter so
    with pytest.raises(ValueError, match=r"merge changes whole base weights.*ZeRO-3.*lightning-peft-export"):
        merge(model)


def test_injecting_into_a_1b_parameter_meta_model_allocates_no_base_weights() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                         num_attention_heads=16, num_key_value_heads=4)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    inject(model, LoRA(r=8, target_modules="all-linear"))
    total = sum(p.numel() for p in model.parameters())
    assert total > 1_000_000_000
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 20 * 8 * (
        2 * (2048 + 2048) + 2 * (2048 + 512) + 2 * (2048 + 5632) + (5632 + 2048))

"""Every method under Lightning's multi-process strategies on CPU (gloo) trains what one process trains: DDP (one
node and two), ddp_spawn and ddp_notebook, FSDP1 (torch directly and Lightning's FSDPStrategy), FSDP2
(ModelParallelStrategy), DeepSpeed ZeRO-2/3. Each launch checks every method it runs against
:func:`strategy_models.one_process_trainables`, after fit and in the checkpoint rank 0 wrote, and resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from strategy_models import (
    ATOL,
    COMPOSED,
    DROPOUT_CELL,
    EXTRA_CELLS,
    METHODS,
    TRAINABLE,
    CausalLM,
    assert_same_tensors,
    checkpoint_tensors,
    fit_adapters,
    fit_lm,
    one_process_trainables,
    tiny_gpt2,
    token_data,
)

from lightning_peft import adapter_state_dict, inject, load_adapter, save_adapter
from lightning_peft.adapter_files.export import export, read_checkpoint


@pytest.fixture
def clean_env() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


#: Variables a launcher or an earlier in-process run leaves behind; a launched script must not inherit them.
_LAUNCHER_VARIABLES = re.compile(r"(MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|"
                                 r"NODE_RANK|ROLE_RANK|ROLE_WORLD_SIZE|TORCHELASTIC_.*|PL_.*)")


def _script_env() -> dict[str, str]:
    """The environment of a launched test script: it imports strategy_models from here, and no launcher variable
    of this process reaches it."""
    inherited = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARIABLES.fullmatch(k)}
    return {**inherited, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "strategy"), [(method, "ddp_spawn") for method in sorted(METHODS)]
                         + [("lora", "ddp_notebook")])  # spawned workers, every method; forked workers (the same
# recovery of the workers' adapter tensors in the main process, whatever the method)
def test_spawn_and_fork_workers_match_one_process_and_the_main_process_gets_their_adapters(
    tmp_path: Path, clean_env: None, method: str, strategy: str
) -> None:
    single = one_process_trainables(method, trainable_modules=TRAINABLE)
    trainer, module, worker = fit_lm(tmp_path, method, "workers", devices=2, batch_size=4, epochs=1,
                                     method_kwargs={"trainable_modules": TRAINABLE}, strategy=strategy)
    assert any(n.startswith("model.transformer.ln_f.") for n in single)
    assert_same_tensors(worker, single, "worker rank 0")
    assert_same_tensors(adapter_state_dict(module), worker, "the main process after fit", exact=True)
    trainer.save_checkpoint(tmp_path / "main.ckpt")  # in the main process: adapter-only, with the trained values
    assert_same_tensors(checkpoint_tensors(tmp_path / "main.ckpt"), worker, "main's checkpoint", exact=True)
    save_adapter(module, tmp_path / "adapter")  # and evaluation: a fresh base with it gives the main's logits
    tokens = token_data()[:2]
    fresh = load_adapter(CausalLM().eval(), tmp_path / "adapter")
    torch.testing.assert_close(fresh.model(input_ids=tokens).logits, module.eval().model(input_ids=tokens).logits,
                               rtol=0, atol=0)


def _check_ddp_runs(out: Path) -> None:
    """Every method's 1-epoch run of tests/scripts/ddp_peft.py, after fit and in its checkpoint, equals one process;
    so does LoRA with a token prompt on one model (DDP without find_unused_parameters: every tensor got a gradient),
    and the extra cells: DoRA (its magnitude too) and LoRA with dropout (each rank's masks)."""
    for method in [*sorted(METHODS), COMPOSED, *EXTRA_CELLS]:
        expected = one_process_trainables(method, epochs=2 if method == COMPOSED else 1, ranks=2,
                                          trainable_modules=TRAINABLE)
        assert_same_tensors(torch.load(out / f"{method}.pt", weights_only=True)["cut"], expected, f"{method}")
        assert_same_tensors(checkpoint_tensors(out / method / "last.ckpt"), expected, f"{method} checkpoint")


@pytest.mark.slow
def test_ddp_matches_one_process_saves_the_trained_tensors_and_resumes_under_ddp_and_on_one_device(
    tmp_path: Path, clean_env: None
) -> None:
    # one torchrun launch, every method with trainable_modules; cut at an epoch end (a run stopped by max_steps
    # mid-loop replays its last epoch when resumed)
    _torchrun("ddp_peft.py", str(tmp_path), "1")
    _check_ddp_runs(tmp_path)
    for method in sorted(METHODS):
        runs = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        assert_same_tensors(runs["straight"], one_process_trainables(method, epochs=2, trainable_modules=TRAINABLE),
                             f"{method} 2 epochs")
        assert_same_tensors(runs["resumed"], runs["straight"], f"{method} resumed", exact=True)
        on_one = fit_adapters(tmp_path, method, f"{method}-one", devices=1, batch_size=8, epochs=2,
                              ckpt_path=str(tmp_path / method / "last.ckpt"),
                              method_kwargs={"trainable_modules": TRAINABLE})
        assert_same_tensors(on_one, runs["straight"], f"{method} resumed on one device")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_ddp_across_two_nodes_matches_one_process_with_double_batch(tmp_path: Path, clean_env: None) -> None:
    # two torchrun agents, one per "node", meet on localhost as a cluster's nodes meet at MASTER_ADDR
    port = str(_free_port())
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                          "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                          str(Path(__file__).parent / "scripts" / "ddp_peft.py"), str(tmp_path), "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_script_env())
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    ranks = [torch.load(tmp_path / f"node{r}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks == [{"node_rank": r, "global_rank": r, "world_size": 2} for r in (0, 1)]
    _check_ddp_runs(tmp_path)


def _torchrun(script: str, *args: str, processes: int = 2) -> None:
    """Run ``tests/scripts/<script>`` on CPU processes with torch.distributed.run (its launcher re-runs argv)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).parent / "scripts" / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_script_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_fsdp1_with_the_wrap_policy_matches_one_process_on_cpu(tmp_path: Path) -> None:
    _torchrun("fsdp1_peft.py", str(tmp_path))  # one launch, every method with trainable_modules
    for method in sorted(METHODS):
        reference = one_process_trainables(method, in_module=False, trainable_modules=TRAINABLE)
        assert_same_tensors(torch.load(tmp_path / f"{method}.pt", weights_only=True), reference, method)
        saved = load_adapter(tiny_gpt2(), tmp_path / f"{method}-adapter")  # what rank 0's save_adapter wrote
        assert_same_tensors(adapter_state_dict(saved), reference, f"{method} saved")


@pytest.mark.slow
def test_fsdp2_sharding_in_configure_model_matches_one_process_with_callback_and_mixin(tmp_path: Path) -> None:
    # one launch: every method through the callback and the mixin, neither calling apply_peft() before fully_shard
    _torchrun("fsdp2_peft.py", str(tmp_path))
    for method in [*sorted(METHODS), *EXTRA_CELLS]:  # the extra cells through the callback only
        reference = one_process_trainables(method, ranks=2, trainable_modules=TRAINABLE)
        for glue in ("callback", "mixin") if method in METHODS else ("callback",):
            report = torch.load(tmp_path / f"{method}-{glue}.pt", weights_only=True)
            for kind in ("trained", "saved"):  # after fit; in the checkpoint rank 0 wrote
                assert_same_tensors(report[kind], reference, f"{method}-{glue} {kind}")
    refused = torch.load(tmp_path / "refused.pt", weights_only=True)["refused"]
    assert re.match(r"lightning_peft cannot inject into HelperLM: fully_shard already sharded .*apply_peft\(\) "
                    r"before fully_shard", refused), refused


@pytest.mark.slow
def test_fsdp2_adapter_only_checkpoints_full_and_sharded_resume_bitwise(tmp_path: Path) -> None:
    _torchrun("fsdp2_checkpoints.py", str(tmp_path), *sorted(METHODS))  # one launch, every method
    for method in sorted(METHODS):
        adapters = {f"model.{k}" for k in adapter_state_dict(inject(tiny_gpt2(), METHODS[method]()))}
        for mode in ("full", "sharded"):  # one file; a torch.distributed.checkpoint directory
            report = torch.load(tmp_path / method / f"{mode}.pt", weights_only=True)
            assert set(report["saved"]) == adapters, f"{method} {mode}"
            assert_same_tensors(report["resumed"], report["straight"], f"{method} {mode} resumed", exact=True)


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "cells"), [(2, ("lora-callback", "prefix-callback", "prompt-callback")),
                                                  (1, ("lora-mixin",))],
                         ids=["2-processes", "1-process"])
def test_lightning_fsdp1_matches_one_process_checkpoints_hold_the_values_and_resume_bitwise(
    tmp_path: Path, processes: int, cells: tuple[str, ...]
) -> None:
    # Lightning's FSDPStrategy itself on CPU processes (tests/scripts/fsdp1_checkpoints.py lifts its GPU checks),
    # one launch for every cell; one process is NO_SHARD, where torch leaves frozen units unregistered after a
    # backward (the callbacks and the mixin mend them; unmended, GPT-2's tied embedding fails the next forward)
    _torchrun("fsdp1_checkpoints.py", str(tmp_path), *cells, processes=processes)
    for cell in cells:
        method = cell.split("-")[0]
        one, two = (one_process_trainables(method, n, momentum=0.9, trainable_modules=TRAINABLE) for n in (1, 2))
        for run in ["full-True", "sharded-True"] + ([] if method == "prompt" else ["sharded-False"]):
            # sharded-False: flat parameters hide the adapter tensors from named_parameters()
            report, label = torch.load(tmp_path / cell / f"{run}.pt", weights_only=True), f"{cell} {run}"
            assert_same_tensors(report["cut"], one, f"{label} 1 epoch")
            assert_same_tensors(checkpoint_tensors(tmp_path / cell / run / "last.ckpt"), one, f"{label} checkpoint")
            assert_same_tensors(report["straight"], two, f"{label} 2 epochs")
            assert_same_tensors(report["resumed"], report["straight"], f"{label} resumed", exact=True)
        _check_fsdp1_refusals(tmp_path / cell, method)


def _check_fsdp1_refusals(out: Path, method: str) -> None:
    checks = torch.load(out / "checks.pt", weights_only=True)
    # a sharded checkpoint without this model's adapter tensors is refused, not loaded around them
    assert re.match(r"the distributed checkpoint lacks \d+ adapter tensors \(model\.transformer",
                    checks["mismatch"]["sharded"])
    assert re.match(r"the checkpoint does not fit the adapters of MomentumLM: it was saved with \w+ method=",
                    checks["mismatch"]["full"])
    if method == "prompt":  # the prompt cannot have a unit of its own: refused at setup, with the fix
        assert "use_orig_params=True" in checks["refused"] and "TokenPrompt" in checks["refused"]
    else:  # Lightning cannot save a full checkpoint with flat parameters: warned at setup, with the fix
        assert checks["refused"] == ""
        assert any("state_dict_type='sharded'" in w for w in checks["warnings"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process_saves_adapters_only_and_resumes(tmp_path: Path, stage: int) -> None:
    # Lightning's DeepSpeedStrategy on 2 CPU processes, its CUDA-only checks lifted (tests/scripts/deepspeed_peft.py);
    # one launch per stage runs every method
    _torchrun("deepspeed_peft.py", str(tmp_path), str(stage), *sorted(METHODS), *EXTRA_CELLS)
    for method in sorted(METHODS):
        _check_deepspeed(tmp_path / method, method, stage)
    for cell in EXTRA_CELLS:  # DoRA, LoRA with dropout (each rank's masks): their 1-epoch run equals one process
        trained = torch.load(tmp_path / cell / "one.pt", weights_only=True)
        assert_same_tensors(trained, one_process_trainables(cell, ranks=2), f"{cell} ZeRO-{stage}")
    for run in ("one", "built") if stage == 3 else ("one",):  # DoRA's magnitude starts at ‖W‖ of the model's W
        assert torch.load(tmp_path / "dora" / f"{run}-info.pt", weights_only=True)["magnitude_error"] < 1e-5, run
    if stage == 3:  # DoRA injected next to partitioned weights (zero.Init draws other base weights: no reference)
        built, start = (torch.load(tmp_path / "dora" / f"{r}.pt", weights_only=True) for r in ("built", "built-start"))
        assert all(torch.isfinite(t).all() and not torch.equal(t, start[n]) for n, t in built.items() if "lora_B" in n)


def _check_deepspeed(out: Path, method: str, stage: int) -> None:
    def load(name: str) -> dict:
        return torch.load(out / f"{name}.pt", weights_only=True)

    initial = adapter_state_dict(inject(CausalLM(), METHODS[method]()))
    one, info = load("one"), load("one-info")
    # seeded by name: every rank starts where one process starts; 2 ranks with batch 4 step like 1 with batch 8
    assert_same_tensors(load("one-start"), initial, f"{method} start", exact=True)
    assert_same_tensors(one, one_process_trainables(method), method)
    assert info["exclude_frozen_parameters"], "the callback makes DeepSpeed save what trains, only"
    assert info["reloaded"], "load_adapter_state_dict must write into every rank's partitions"
    if stage == 3:  # persistence threshold 0: the adapters themselves were partitioned, prompts included
        assert set(one) <= set(info["partitioned"])

    # DeepSpeed's checkpoint directory holds the trained tensors; under ZeRO-3 the exporter joins the ranks' slices
    checkpoint = read_checkpoint(out / "one" / "last.ckpt")
    assert checkpoint["state_dict"].keys() == one.keys()
    exported = export(out / "one" / "last.ckpt", out / "exported", prefix="model.")
    exported_state = adapter_state_dict(load_adapter(tiny_gpt2(), exported))
    saved_state = adapter_state_dict(load_adapter(tiny_gpt2(), out / "adapter"))  # save_adapter on every rank
    peft_state = adapter_state_dict(load_adapter(tiny_gpt2(), out / "adapter-peft"))  # format="peft", too
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
    bf16_checkpoint = read_checkpoint(out / "bf16" / "last.ckpt")["state_dict"]
    assert bf16_checkpoint.keys() == bf16.keys() == one.keys()
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    for name, tensor in bf16.items():
        assert torch.equal(bf16_checkpoint[name].to(torch.bfloat16), tensor), name




def test_the_dropout_cells_reference_tells_each_ranks_masks_from_one_mask_and_from_no_dropout() -> None:
    # what makes the DROPOUT_CELL comparisons above mean something: drawing one mask for the whole batch, or no
    # dropout at all, moves the trained tensors by far more than the tolerance
    per_rank = one_process_trainables(DROPOUT_CELL, ranks=2)
    for other, label in ((one_process_trainables(DROPOUT_CELL, ranks=1), "one mask"),
                         (one_process_trainables("lora", ranks=2), "no dropout")):
        assert max((per_rank[n] - other[n]).abs().max().item() for n in per_rank) > 100 * ATOL, label

"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process run with the same
global batch (gradient accumulation included: reduced once per step), each rank reads only its rows
of it, and only rank 0 writes. torchrun with one process joins a process group too: gloo on the
CPU and (marked ``cuda``) NCCL on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hyperbit.data import TokenShards, prepare
from hyperbit.train.batches import rank_batch, rank_rows

HERE = Path(__file__).parent
# CPU explicitly: on a machine with one GPU, "auto" would put both processes on it
ARGS = ["--preset", "tiny", "train.steps=6", "train.log_every=1", "train.eval_batches=1",
        "train.precision=fp32", "model.pathway=hc", "model.expansion_rate=2", "train.grad_accum=2",
        "train.device=cpu"]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 7)), steps  # each step logged once: only rank 0 writes
    return [r["loss"] for r in records if "loss" in r]


def _run(out: Path, *extra: str, procs: int = 1, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={procs}"] if procs > 1 or torchrun else [sys.executable])
    return _launch([*launcher, "-m", "hyperbit.cli", "train", "--out", str(out), *ARGS, *extra], out)


def _launch(cmd: list[str], out: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; it must succeed. Once only, a run whose worker the C++ runtime aborted
    ("terminate called without an active exception", SIGABRT: the torch/gloo exit-time abort
    that ``hyperbit.cli._end_worker`` sidesteps) is run again from the same starting state, with
    a warning; any other failure fails at once, with the error lines of every rank shown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = None
    if out is not None and out.exists():
        before = out.with_name(out.name + ".before")
        shutil.copytree(out, before)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        warnings.warn(f"a torchrun worker aborted at exit; running again: {' '.join(cmd[-6:])}")
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
            if before is not None:
                shutil.copytree(before, out)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if before is not None:
        shutil.rmtree(before)
    errors = [line for line in result.stderr.splitlines()
              if any(word in line for word in ("rror", "terminate", "what()", "Fatal", "exitcode"))]
    assert result.returncode == 0, "\n".join(errors[:40]) + "\n...\n" + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single") / "run"
    _run(out)
    return _losses(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one_process(tmp_path, single, strategy):
    out = tmp_path / "run"
    result = _run(out, f"train.distributed={strategy}", procs=2)
    losses = _losses(out)
    assert losses == pytest.approx(single, rel=2e-5, abs=2e-5)
    assert result.stdout.count("done: step 6") == 1  # rank 0 alone reports
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_resume_continues_exactly(tmp_path, strategy):
    """Rewind a finished 2-process run to its step-3 checkpoint and resume it: steps 4-6 come out
    as before (the checkpoint holds the full, unsharded state, gathered from every rank)."""
    out = tmp_path / "run"
    _run(out, f"train.distributed={strategy}", "train.save_every=3", procs=2)
    before = _losses(out)
    ckpts = out / "checkpoints"
    (ckpts / "latest").write_text("step_00000003\n")
    shutil.rmtree(ckpts / "step_00000006")
    result = _run(out, f"train.distributed={strategy}", "train.save_every=3", "--resume", procs=2)
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    assert _losses(out) == pytest.approx(before, rel=1e-6, abs=1e-7)


# on the CPU a subset of test_two_processes_match_one_process: in the slow run only
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), *DEVICES[1:]])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_with_one_process_runs_the_strategy(tmp_path, strategy, device):
    """One process under torchrun joins a process group (gloo on the CPU, NCCL on a GPU), wraps
    the model in DDP / FSDP2 and follows the plain process exactly."""
    plain, launched = tmp_path / "plain", tmp_path / "launched"
    on = [f"train.device={device}", *(["train.deterministic=true"] if device == "cuda" else [])]
    _run(plain, *on)
    result = _run(launched, *on, f"train.distributed={strategy}", torchrun=True)
    assert _losses(launched) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    assert "done: step 6" in result.stdout


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_accumulation_reduces_gradients_once_per_step(strategy):
    """Two micro-steps, 2 processes: the first reduces nothing, the last leaves every rank with
    the gradients that reducing after every micro-step gives (up to the order of the sums)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_grad_sync.py"), strategy]
    result = _launch(cmd)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["accumulated"] == {"reduced_after_first": False, "ranks_agree_at_end": True}
    assert got["every"] == {"reduced_after_first": True, "ranks_agree_at_end": True}
    assert got["max_rel_diff"] < 1e-5 and got["grads"] > 10
    if strategy == "fsdp2":  # precision bf16: blocks compute with bf16 parameters, reduce in fp32
        assert got["param_dtype"] == "torch.bfloat16"
        assert got["sharded_grad_dtypes"] == ["torch.float32"]
        assert got["bf16_representable"] < 0.8, got  # reduced in fp32, not bf16


def test_each_rank_reads_its_own_rows_of_the_global_batch(tmp_path):
    """Rank r of 2 reads rows [m*micro + r*per_rank, ...) of micro-batch m: disjoint, and together
    the single process's global batch, whatever the accumulation."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)))
    prepare(corpus, tmp_path / "data", val_fraction=0.0)
    data = TokenShards(tmp_path / "data", "train")
    batch, seq, step, seed = 8, 16, 5, 3
    x_all, y_all = data.get_batch(step, batch, seq, seed=seed)
    assert len({tuple(r) for r in x_all.tolist()}) == batch  # distinct windows: a meaningful check
    for accum in (1, 2):
        rows = [rank_rows(batch, accum, r, 2) for r in range(2)]
        flat = [i for r in rows for micro in r for i in micro]
        assert sorted(flat) == list(range(batch))  # disjoint, and every row once
        parts = [rank_batch(data, step, batch, seq, seed, accum, rank=r, world_size=2) for r in range(2)]
        for m in range(accum):  # micro-batch m = rank 0's slice, then rank 1's
            x = torch.cat([parts[r][0][m] for r in range(2)])
            y = torch.cat([parts[r][1][m] for r in range(2)])
            micro = batch // accum
            assert torch.equal(x, x_all[m * micro:(m + 1) * micro])
            assert torch.equal(y, y_all[m * micro:(m + 1) * micro])
    # a rank reads its own windows only
    reads = []
    original = data.read
    data.read = lambda start, length: reads.append(start) or original(start, length)
    rank_batch(data, step, batch, seq, seed, 2, rank=1, world_size=2)
    assert len(reads) == batch // 2


@pytest.mark.parametrize("requested, local_rank, procs, gpus, expected", [
    ("auto", 1, 2, 2, "cuda:1"),  # one GPU per process: each its own
    ("auto", 1, 2, 1, "cpu"),  # fewer GPUs than processes: the CPU (gloo), not a shared or missing GPU
    ("auto", 0, 2, 1, "cpu"),  # ... for every rank alike (one backend for the group)
    ("cuda", 0, 2, 1, "needs one GPU per process: 2 processes on this node, 1 GPU(s)"),
    ("cpu", 0, 2, 2, "cpu"),
    ("auto", 0, 1, 1, "cuda:0"),
])
def test_each_torchrun_process_gets_its_own_gpu_or_the_cpu(monkeypatch, requested, local_rank, procs, gpus,
                                                            expected):
    from hyperbit.config import ConfigError
    from hyperbit.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    env = {"RANK": str(local_rank), "WORLD_SIZE": str(procs), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(procs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if expected.startswith("needs"):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            distributed.train_device(requested)
    else:
        assert str(distributed.train_device(requested)) == expected
    monkeypatch.delenv("MASTER_PORT")  # not a torchrun launch: the plain choice
    assert str(distributed.train_device(requested if requested != "cuda" else "auto")) == (
        "cpu" if requested == "cpu" else "cuda")

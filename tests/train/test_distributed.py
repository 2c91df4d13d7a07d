"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process run with the same
global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--preset", "tiny", "train.steps=6", "train.log_every=1", "train.eval_batches=1",
        "train.precision=fp32", "model.pathway=hc", "model.expansion_rate=2"]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 7)), steps  # each step logged once: only rank 0 writes
    return [r["loss"] for r in records if "loss" in r]


def _run(out: Path, *extra: str, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable])
    cmd = [*launcher, "-m", "hyperbit.cli", "train", "--out", str(out), *ARGS, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
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

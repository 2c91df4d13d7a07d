"""`hyperbit train`: it learns, it logs, it resumes bit for bit after SIGKILL, and bad input ends
in one line with exit code 2 without touching the user's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperbit.cli import main

FAST = ["train.log_every=1", "train.eval_batches=1"]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]


def _records(run: Path, key: str = "loss") -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r}


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hyperbit.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "--preset", "tiny", "--dry-run", "model.pathway=hc",
                 "model.expansion_rate=4", "train.lr=1e-3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["pathway"] == "hc" and cfg["model"]["expansion_rate"] == 4
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["steps"] == 20 and cfg["data"]["path"] == "pystdlib"


def test_tiny_run_learns_and_logs(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=40",
                 "model.pathway=hc", "model.expansion_rate=2", *FAST]) == 0
    losses = _records(run)
    assert sorted(losses) == list(range(1, 41))  # every step logged, with step and loss
    assert sum(list(losses.values())[-5:]) / 5 < losses[1] - 1.0  # ln 256 = 5.55 -> clearly lower
    val = _records(run, "val_bpb")
    assert set(val) == {10, 20, 30, 40} and val[40] < 8.0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    out = capsys.readouterr().out
    assert "bits/byte" in out and "wiring check: PASS (hc, n=2, fp)" in out


@pytest.mark.parametrize("device", DEVICES)
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, device):
    """On CUDA with deterministic kernels (``train.deterministic``: attention's backward and
    cuBLAS otherwise reduce in a varying order); the CPU is deterministic as it is."""
    args = ["--preset", "tiny", "train.steps=60", "train.batch_size=8", "train.seq_len=64",
            "train.save_every=5", "train.eval_every=0", "model.pathway=hc", "model.expansion_rate=2",
            f"train.device={device}", *(["train.deterministic=true"] if device == "cuda" else []), *FAST]
    full = tmp_path / "full"
    proc = _cli("--out", str(full), *args)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    run = tmp_path / "killed"
    proc = _cli("--out", str(run), *args)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 once it is well into the run, between checkpoints
        if (run / "metrics.jsonl").exists() and max(_records(run), default=0) >= 23:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_records(run))
    assert killed_at < 60, "the run finished before it could be killed"
    resumed = _cli("--out", str(run), "--resume", *args)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    assert _records(run) == _records(full)  # every step's loss, bit for bit (JSON floats round-trip)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_existing_run_needs_resume_or_overwrite_and_is_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=2", *FAST]) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=2", *FAST]) == 2
    assert "already exists; pass --resume" in _error(capsys)
    assert main(["train", "--preset", "tiny", "--out", str(run), "--resume", "train.steps=2",
                 "train.lr=1e-3", *FAST]) == 2
    err = _error(capsys)
    assert "different config" in err and "train.lr: saved 0.003, given 0.001" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert main(["train", "--out", str(run), "--resume"]) == 0  # bare resume: the saved config
    assert "run already complete at step 2 of 2" in capsys.readouterr().out


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert main(["train", "--preset", "tiny", "--out", str(mine), "--overwrite"]) == 2
    assert "not a hyperbit run directory" in _error(capsys)
    assert (mine / "chapter1.tex").read_text() == "precious"


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown train config key 'train.lrr'"),
    ("model.expansion_rate=0", "expansion_rate must be >= 1"),
    ("data.path=/no/such/corpus", "no such file or directory"),
    ("train.seq_len=100000", "train.seq_len=100000 exceeds model.max_seq_len=64"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, override, needle):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), override]) == 2
    assert needle in _error(capsys)


def test_corrupt_checkpoint_on_resume_is_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=4",
                 "train.save_every=2", *FAST]) == 0
    weights = run / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--out", str(run), "--resume", "train.steps=4",
                 "train.save_every=2", *FAST]) == 2
    assert "model.safetensors" in _error(capsys)


def test_non_finite_step_is_caught_at_the_next_host_sync_and_never_saved(tmp_path, capsys):
    """Steps do not wait for the device: a non-finite loss is noticed at the next step that logs,
    evaluates, monitors or saves, which reports the first bad step and writes no checkpoint of
    what followed it."""
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(run), "train.lr=1e30", "train.warmup_steps=0",
                 "train.clip=0", "train.steps=12", "train.log_every=100", "train.eval_every=0",
                 "train.monitor_every=0", "train.save_every=5"])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss at step " in err
    # step 1 is finite and moves the weights to ~1e30; a later step is the first bad one, found at
    # the first sync (the save of step 5), not at the end (step 12), and before that save
    first_bad = int(err.split("non-finite loss at step ")[1].split(" ")[0])
    assert 1 < first_bad < 5 and "last good checkpoint: none" in err
    assert not list(run.glob("checkpoints/step_*"))
    assert _records(run) == {}  # no log step was reached


def test_non_finite_loss_stops_with_exit_3_and_keeps_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(run), "train.lr=1e30",
                 "train.warmup_steps=0", "train.clip=0", "train.save_every=1", *FAST])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss" in err and "last good checkpoint" in err
    assert (run / "checkpoints" / "latest").exists()


def test_tensorboard_gets_every_metric_when_installed(tmp_path, monkeypatch):
    """Stand in for tensorboard's SummaryWriter (an optional dependency) and check what it gets."""
    import types

    scalars, closed = [], []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            closed.append(self.logdir)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=4", *FAST]) == 0
    losses = _records(run)
    assert [(s, v) for k, v, s in scalars if k == "loss"] == sorted(losses.items())
    assert any(k == "val_bpb" and s == 4 for k, _, s in scalars)
    assert closed == [str(run / "tensorboard")]
    # Post-Norm's composite gain is undefined (null): the writer gets collapse, and no gain
    scalars.clear()
    post = tmp_path / "post"
    assert main(["train", "--preset", "tiny", "--out", str(post), "train.steps=4", "train.monitor_every=2",
                 "model.pathway=postnorm", *FAST]) == 0
    keys = {k for k, _, _ in scalars}
    assert "monitor/collapse_median_last" in keys and "monitor/gain_row_last" not in keys


def test_empty_data_is_exit_2(tmp_path, capsys):
    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), f"data.path={empty}"]) == 2
    assert "empty" in _error(capsys).lower()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 in 2 micro-batches of 4 follows batch 8 in one go (fp32; same global batch)."""
    args = ["--preset", "tiny", "train.steps=5", "train.batch_size=8", "train.precision=fp32", *FAST]
    assert main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    assert main(["train", "--out", str(tmp_path / "two"), *args, "train.grad_accum=2"]) == 0
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-5)


@pytest.mark.slow
def test_compiled_training_follows_eager(tmp_path):
    args = ["--preset", "tiny", "train.steps=4", "train.precision=fp32", "model.pathway=hc",
            "model.expansion_rate=2", *FAST]
    assert main(["train", "--out", str(tmp_path / "eager"), *args]) == 0
    assert main(["train", "--out", str(tmp_path / "compiled"), *args, "train.compile=true"]) == 0
    eager, compiled = _records(tmp_path / "eager"), _records(tmp_path / "compiled")
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=1e-4)


def test_resume_with_no_checkpoint_restarts_with_a_clean_log(tmp_path, capsys):
    """A run killed before its first checkpoint restarts from step 0 on --resume; the steps it
    logged before are dropped (they are logged again), so each step appears once."""
    import shutil

    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--out", str(run), "train.steps=4", "train.save_every=0",
            "train.eval_every=0", *FAST]
    assert main(args) == 0
    first = _records(run)
    shutil.rmtree(run / "checkpoints")  # as if killed before the end-of-run save
    assert main([*args, "--resume"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4] and _records(run) == first

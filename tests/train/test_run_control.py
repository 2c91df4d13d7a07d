"""Running `hyperbit train` as a user does: precision chosen for the machine, Ctrl-C / SIGTERM
save and stop, one writer per run directory, nothing left by a run that never started, and
`--resume` continuing the saved run with the overrides on top."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperbit.cli import main
from hyperbit.train import allocator, precision
from hyperbit.train.rundir import LOCK_FILE

FAST = ["train.log_every=1", "train.eval_batches=1", "train.monitor_every=0"]
TINY = ["train", "--preset", "tiny", *FAST]


def _records(run: Path, key: str = "loss") -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r}


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hyperbit", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(_records(run), default=0) >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run did not reach step {step}: {proc.stderr.read() if proc.poll() else ''}")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- precision -------------------------------------------------------------------------------


def test_auto_precision_follows_the_cpu_flags(tmp_path, monkeypatch):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t: avx2\n")
    bf16 = tmp_path / "bf16"
    bf16.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n")
    assert "avx2" in precision._cpu_flags(str(avx2)) and "avx512_bf16" in precision._cpu_flags(str(bf16))
    read = precision._cpu_flags
    for path, expected in ((bf16, "bf16"), (avx2, "fp32")):  # the avx2 machine last
        monkeypatch.setattr(precision, "_cpu_flags", lambda p=str(path): read(p))
        assert precision.resolve_precision("auto", "cpu") == expected
        assert precision.describe("auto", "cpu") == (
            f"precision: {expected} (auto: this CPU "
            f"{'computes bf16 natively' if expected == 'bf16' else 'has no native bf16'})")
    assert precision.resolve_precision("fp16", "cpu") == "fp16"  # explicit values are kept
    assert "emulates bf16" in precision.describe("bf16", "cpu")  # the avx2 machine, asked for bf16
    with pytest.raises(ValueError, match="choose one of"):
        precision.resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("native, stored", [(False, "fp32"), (True, "bf16")])
def test_a_new_run_stores_the_resolved_precision_and_says_it(tmp_path, capsys, monkeypatch, native, stored):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run), "train.steps=2"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == stored
    out = capsys.readouterr().out
    assert f"precision: {stored} (auto: " in out
    # on the CPU, with glibc, the allocator keeps freed memory for the next step (train/allocator.py)
    assert ("CPU allocator: freed memory kept" in out) == (allocator._glibc() is not None)


def test_fp16_trains_with_a_scaler_and_resumes_bit_for_bit(tmp_path):
    args = [*TINY, "train.precision=fp16", "train.steps=6", "train.save_every=3", "train.eval_every=0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, "--out", str(full)]) == 0
    losses = _records(full)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    state = json.loads((full / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0  # the scaler's state is part of the checkpoint
    assert main([*args, "--out", str(cut)]) == 0
    shutil.rmtree(cut / "checkpoints" / "step_00000006")  # back to step 3, as if stopped there
    (cut / "checkpoints" / "latest").write_text("step_00000003\n")
    assert main(["train", "--out", str(cut), "--resume"]) == 0
    assert _records(cut) == losses


# --- interrupts --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130),
                                       pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_a_signal_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(tmp_path, sig, code):
    args = ["--preset", "tiny", "train.steps=40", "train.batch_size=8", "train.seq_len=64",
            "train.save_every=1000", "train.eval_every=0", *FAST]
    full = tmp_path / "full"
    proc = _cli("--out", str(full), *args)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    run = tmp_path / "stopped"
    proc = _cli("--out", str(run), *args)
    _wait_for_step(proc, run, 5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err
    stopped_at = max(_records(run))
    assert stopped_at < 40, "the run finished before the signal"
    ckpt = run / "checkpoints" / f"step_{stopped_at:08d}"
    assert (ckpt / "COMPLETE").exists()  # saved though save_every is far away
    assert f"checkpoint saved to {ckpt}" in err and f"--out {run} --resume" in err
    assert not (run / LOCK_FILE).exists()
    resumed = _cli("--out", str(run), "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resumed from {ckpt} at step {stopped_at}" in out
    assert _records(run) == _records(full)  # every step's loss, bit for bit


# --- the run directory -------------------------------------------------------------------------


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run), "train.steps=2"]) == 0
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": time.time()}))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for extra in (["--overwrite"], ["--resume", "train.steps=3"]):
        assert main([*TINY, "--out", str(run), "train.steps=2", *extra]) == 2
        assert f"is in use by process {os.getpid()}" in _error(capsys)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the live run is untouched
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the lock of a killed process
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))
    assert main([*TINY, "--out", str(run), "--resume", "train.steps=3"]) == 0
    assert max(_records(run)) == 3 and not (run / LOCK_FILE).exists()


def test_overwrite_while_another_process_trains_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _cli("--out", str(run), "--preset", "tiny", "train.steps=400", "train.eval_every=0", *FAST)
    try:
        _wait_for_step(proc, run, 2)
        assert main([*TINY, "--out", str(run), "--overwrite"]) == 2
        assert "is in use by process" in _error(capsys)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=600)
    assert proc.returncode == 143 and (run / "config.json").exists()


def test_a_run_that_never_starts_leaves_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--out", str(run), "data.path=/no/such/corpus"]) == 2
    assert "no such file or directory" in _error(capsys)
    assert not run.exists()
    assert main([*TINY, "--out", str(run), "train.steps=2"]) == 0  # fixed: the same command works


def test_resume_applies_overrides_to_the_saved_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=2",
                 "train.save_every=0", *FAST]) == 0  # not the default max_bytes, lr, ...
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "train.steps=4", "train.eval_every=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out and max(_records(run)) == 4
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == 4 and saved["data"]["max_bytes"] == 200_000
    assert main(["train", "--out", str(run), "--resume", "model.dim=64"]) == 2
    err = _error(capsys)
    assert "model.dim: saved 32, given 64" in err and "train.steps" in err  # names what may change
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "nothing to resume" in _error(capsys) and not (tmp_path / "nothing").exists()


# --- the command line --------------------------------------------------------------------------


def test_overrides_anywhere_on_the_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "model.dim=16", "--preset", "tiny", "--out", str(run), "train.steps=2",
                 "--dry-run", "train.lr=1e-3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["model"]["dim"], cfg["train"]["steps"], cfg["train"]["lr"]) == (16, 2, 1e-3)
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny", "--bogus"])


@pytest.mark.parametrize("override, needle", [
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("train.lr=nan", "train.lr must be > 0, got nan"),
    ("model.expansion_rate=1000", "expansion_rate must be <= 32 (allowed: 1 .. 32), got 1000"),
    ("train.steps=10000000000", "train.steps must be <= 1000000000"),
])
def test_out_of_range_values_name_the_allowed_range(tmp_path, capsys, override, needle):
    assert main([*TINY, "--out", str(tmp_path / "r"), "model.pathway=hc", override]) == 2
    assert needle in _error(capsys) and not (tmp_path / "r").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main([*TINY, "--out", str(path)]) == 2
    assert "is a file" in _error(capsys) and path.read_text() == "mine"


def test_version_presets_and_module_entry_point(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("hyperbit 0.")
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "run presets" in out and "model presets" in out and "demo" in out and "olmo-1b" in out
    proc = subprocess.run([sys.executable, "-m", "hyperbit", "train", "--help"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "model.expansion_rate [1]" in proc.stdout
    assert "train.precision [auto]" in proc.stdout


def test_divergence_names_what_was_not_finite(tmp_path, capsys):
    run = tmp_path / "run"
    code = main([*TINY, "--out", str(run), "train.lr=1e30", "train.warmup_steps=0", "train.clip=0",
                 "train.save_every=1"])
    err = _error(capsys)
    assert code == 3 and err.count("stopped") == 1 and "(exit code 3)" in err
    loss = float(err.split("(loss ")[1].split(",")[0])
    what = "gradient norm" if torch.isfinite(torch.tensor(loss)) else "loss"
    assert f"non-finite {what} at step" in err and "last good checkpoint" in err


def test_data_prepared_without_a_validation_split_trains_without_evaluations(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)))
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(corpus), str(prepared), "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]  # the train command prepare suggests
    assert printed.startswith("train on it: hyperbit train ")
    run = tmp_path / "run"
    suggested = printed.removeprefix("train on it: hyperbit ").split()
    assert main([*suggested, "--preset", "tiny", "--out", str(run), "train.steps=3", *FAST]) == 0
    out = capsys.readouterr().out
    assert "has no validation split: training without evaluations or monitors" in out
    assert "done: step 3, train loss" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not [r for r in records if "val_loss" in r or "monitor" in r]

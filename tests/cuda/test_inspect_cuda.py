"""`hyperbit inspect` on a run trained on a GPU: it analyses on the GPU (the run's device) and its
numbers equal the CPU's analysis of the same checkpoint (the analysis runs in fp32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hyperbit.cli import main

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inspect(capsys, run, device: str, out) -> dict:
    capsys.readouterr()
    args = ["inspect", str(run), "--json", "--out", str(out)] + (["--device", device] if device else [])
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _close(a, b, tol: float) -> None:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape and np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_inspect_a_run_trained_on_the_gpu(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=4", "train.device=cuda",
                 "train.eval_every=0", "train.save_every=0", "train.eval_batches=1", "train.monitor_every=2",
                 "model.pathway=hc", "model.expansion_rate=2"]) == 0
    gpu = _inspect(capsys, run, "", tmp_path / "gpu")  # the run's own device
    cpu = _inspect(capsys, run, "cpu", tmp_path / "cpu")
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["monitors"] is not None  # the monitors logged during GPU training are read back
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4)
    _close(gpu["connection_matrix"]["C"], cpu["connection_matrix"]["C"], 1e-4)
    _close(gpu["composite_gain"]["row"], cpu["composite_gain"]["row"], 1e-4)
    for key in ("median", "p05", "p95"):
        _close(gpu["collapse"][key], cpu["collapse"][key], 1e-4)
    _close(gpu["grad_norm"]["total"], cpu["grad_norm"]["total"], 1e-3)

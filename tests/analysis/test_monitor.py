"""Training monitors: composite gain and collapse logged every k steps, equal to the offline metrics,
on the CPU and (marked ``cuda``) on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

import hyperbit as hb
from hyperbit.cli import main
from hyperbit.analysis import collapse, composite_gain, model_branch_weights, pathway_summary
from hyperbit.analysis.monitor import MONITOR_WINDOWS
from hyperbit.train.precision import autocast
from hyperbit.runs import find_run_data, load_trained

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]


def _monitors(run) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["monitor"] for r in lines if "monitor" in r}


@pytest.mark.parametrize("device", DEVICES)
def test_summary_matches_the_offline_metrics(device):
    torch.manual_seed(0)
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, pathway="hc",
                         expansion_rate=2)
    model = hb.build_model(cfg)
    with torch.no_grad():  # move away from init so gain and collapse are not trivial
        for name, p in model.named_parameters():
            if "dynamic_" in name or "static_" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.to(device)
    idx = torch.randint(0, 64, (2, 8)).to(device)
    got = pathway_summary(model, idx)
    rows, cols = composite_gain(model_branch_weights(model, idx))
    stats = collapse(model, idx)
    assert got["gain_row"] == pytest.approx(rows.tolist(), abs=1e-6)
    assert got["gain_col"] == pytest.approx(cols.tolist(), abs=1e-6)
    assert max(got["gain_row"]) > 1.01  # the mixing moved: a non-trivial check
    for key in ("median", "p05", "p95"):
        assert got[f"collapse_{key}"] == pytest.approx(stats[key].tolist(), abs=1e-6)
    assert model.training  # the summary leaves the mode as it found it


@pytest.mark.parametrize("device", DEVICES)
def test_prenorm_has_unit_gain(device):
    """Pre-Norm's connection weights are made on the CPU (the n = 1 identity): the summary moves
    them to the model's device."""
    torch.manual_seed(0)
    model = hb.build_model(hb.ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=16))
    got = pathway_summary(model.to(device), torch.randint(0, 64, (1, 8)).to(device))
    assert got["gain_row"] == [1.0] * 6 and got["gain_col"] == [1.0] * 6
    assert len(got["collapse_median"]) == 5


def test_postnorm_gain_is_undefined_not_one():
    """Post-Norm renormalises after every branch: no fixed connection weights, so no composite gain
    (null in metrics.jsonl, as inspect reports it); its collapse is measured as for any pathway."""
    torch.manual_seed(0)
    model = hb.build_model(hb.ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=16,
                                          pathway="postnorm"))
    idx = torch.randint(0, 64, (2, 8))
    got = pathway_summary(model, idx)
    assert got["gain_row"] is None and got["gain_col"] is None
    assert json.loads(json.dumps(got))["gain_row"] is None  # null in JSON
    stats = collapse(model, idx)
    for key in ("median", "p05", "p95"):
        assert got[f"collapse_{key}"] == pytest.approx(stats[key].tolist(), abs=1e-6)
    assert len(got["collapse_median"]) == 5


@pytest.mark.parametrize("device", DEVICES)
def test_training_logs_monitors_every_k_steps(tmp_path, device):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "model.pathway=hc",
                 "model.expansion_rate=2", "train.steps=6", "train.monitor_every=4",
                 "train.eval_every=0", "train.save_every=0", "train.eval_batches=1",
                 f"train.device={device}"]) == 0
    monitors = _monitors(run)
    assert sorted(monitors) == [4, 6]  # every 4 steps, and at the end
    K = 4
    assert len(monitors[6]["gain_row"]) == K and len(monitors[6]["collapse_median"]) == K - 1
    # the logged final summary is what the saved model gives on the first MONITOR_WINDOWS (two)
    # validation windows, the batch inspect's summary.json says the monitors used
    model, cfg, _, info = load_trained(run)
    assert info["device"].type == device  # the run's train.device
    shards = hb.data.TokenShards(find_run_data(cfg, info["run_dir"]), "val")
    assert MONITOR_WINDOWS == 2
    idx = next(shards.iter_eval_batches(MONITOR_WINDOWS, cfg.train.seq_len, max_batches=1))[0]
    with autocast(cfg.train.precision, device):  # the precision the run resolved to and trained in
        expected = pathway_summary(model, idx.to(device))
    assert monitors[6] == expected
    assert monitors[4] != monitors[6]


def test_monitors_can_be_turned_off(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.steps=3", "train.monitor_every=0",
                 "train.eval_every=0", "train.save_every=0", "train.eval_batches=1"]) == 0
    assert _monitors(run) == {}

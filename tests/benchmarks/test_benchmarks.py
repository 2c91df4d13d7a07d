"""Smoke test of the benchmark scripts: they run end to end and write well-formed JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "pathway_overhead.py"


def test_pathway_overhead_quick(tmp_path):
    out = tmp_path / "pathway_overhead.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--steps", "1", "--warmup", "1",
         "--configs", "prenorm,dhc4", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DHC x4" in proc.stdout and "targets" in proc.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "pathway_overhead"
    for key in ("platform", "cpu_model", "torch", "torch_threads", "date"):
        assert data["machine"][key], key
    s = data["settings"]
    assert (s["rounds"], s["steps"], s["quick"], s["threads"]) == (1, 1, True, 2)

    assert set(data["configs"]) == {"prenorm", "dhc4"}
    for name, c in data["configs"].items():
        assert c["params"] > 0
        step = c["step"]
        assert len(step["raw_ms_per_round"]) == 1 and len(step["raw_ms_per_round"][0]) == 1
        assert all(t > 0 for rnd in step["raw_ms_per_round"] for t in rnd)
        assert step["median_ms"] > 0 and step["ratio_vs_prenorm"] > 0
        mem = c["peak_memory"]
        assert mem["mib"] > 0 and mem["ratio_vs_prenorm"] > 0
        act = c["saved_activations"]
        assert act["bytes"] > 0 and act["mib"] > 0 and act["ratio_vs_prenorm"] > 0
    base = data["configs"]["prenorm"]
    assert base["step"]["ratio_vs_prenorm"] == 1.0
    assert base["peak_memory"]["ratio_vs_prenorm"] == 1.0
    assert base["saved_activations"]["ratio_vs_prenorm"] == 1.0
    assert data["configs"]["dhc4"]["model_config"]["expansion_rate"] == 4

    targets = {t["name"]: t for t in data["targets"]}
    assert set(targets) == {"dhc4_step", "dhc4_peak_memory", "bitlinear_step"}
    assert isinstance(targets["dhc4_step"]["passed"], bool)
    assert isinstance(targets["dhc4_peak_memory"]["passed"], bool)
    assert targets["bitlinear_step"]["passed"] is None  # prenorm_bitnet was not run


def test_inspect_time_smoke(tmp_path):
    out = tmp_path / "inspect_time.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inspect_time.py"), "--repeats", "1",
                           "--steps", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hyperbit inspect (whole command)" in proc.stdout and "targets" in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "inspect_time" and data["settings"]["repeats"] == 1
    for key in ("command_s", "import_torch_s", "analysis_s"):
        assert data[key]["n"] == 1 and data[key]["median"] > 0, key
    assert data["command_s"]["median"] > data["analysis_s"]["median"]  # start-up and plots on top
    assert data["targets"][0]["passed"] is (data["command_s"]["median"] < 30.0)


def test_monitor_cost_smoke(tmp_path):
    out = tmp_path / "monitor_cost.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "monitor_cost.py"), "--preset", "tiny",
                           "--rounds", "1", "--steps", "1", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "monitor/step" in proc.stdout and "targets" in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "monitor_cost" and set(data["pathways"]) == {"prenorm", "postnorm", "shc4", "dhc2", "dhc4"}
    for name, p in data["pathways"].items():
        assert p["step_ms"] > 0 and p["monitor_ms"] > 0, name
        assert p["monitor_share"] == pytest.approx(p["monitor_ms"] / (p["monitor_every"] * p["step_ms"]))
    assert [t["passed"] for t in data["targets"]] == [p["monitor_share"] < 0.01 for p in data["pathways"].values()]

"""Smoke test of benchmarks/compare_overhead.py: --quick runs end to end and writes well-formed JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compare_overhead.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_compare_overhead_quick(tmp_path):
    out = tmp_path / "compare_overhead.json"
    proc = subprocess.run(
        # one torch thread: on a shared machine, OpenMP threads waiting on a descheduled sibling
        # can slow the tiny steps down a hundredfold
        [sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "prenorm" in proc.stdout and "dhc4" in proc.stdout and "targets" in proc.stdout
    assert "one metrics line" in proc.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "compare_overhead"
    for key in ("platform", "cpu_model", "torch", "torch_threads", "date", "source_digest"):
        assert data["machine"][key], key
    s = data["settings"]
    assert (s["quick"], s["preset"], s["rounds"], s["arms"]) == (True, "tiny", 1, ["prenorm", "dhc4"])
    assert s["threads"] == s["threads_flag"] == 1
    assert s["log_every"] == {"train": 5, "compare": 1}
    steps, window = s["steps"], s["window"]
    assert 0 < window["from_step"] < window["to_step"] == steps
    assert window["from_step"] % s["log_every"]["train"] == 0
    assert s["tokens_per_step"] == s["batch_size"] * s["seq_len"] > 0
    assert s["target_ratio"] == 1.02
    assert data["data"]["prepare_s"] > 0 and data["data"]["tokens"]["train"] > 0

    line = data["metrics_line"]
    assert _positive(line["us"]) and len(line["us_per_batch"]) == line["batches"] > 0
    assert all(_positive(x) for x in line["us_per_batch"])
    assert line["repeats"] > 0 and line["record_bytes"] > 0 and "elapsed_s" in line["record"]

    arms = data["arms"]
    assert set(arms) == {"prenorm", "dhc4"}
    assert arms["prenorm"]["model_config"]["pathway"] == "prenorm"
    assert arms["dhc4"]["model_config"]["pathway"] == "hc"
    assert arms["dhc4"]["model_config"]["expansion_rate"] == 4
    assert arms["dhc4"]["model_config"]["hc_dynamic"] is True
    for name, a in arms.items():
        assert a["params"] > 0, name
        # the two sides' configs differ in the logging cadence and nothing else
        assert a["config_difference"] == {"train.log_every": [5, 1]}, name
        for side, records in (("train", math.ceil(steps / 5)), ("compare", steps)):
            r = a[side]
            assert len(r["step_ms_per_round"]) == 1 and _positive(r["step_ms"]), (name, side)
            assert all(_positive(x) for x in r["step_ms_per_round"]), (name, side)
            assert _positive(r["tokens_per_s"]) and _positive(r["step_ms_summary"]["median"]), (name, side)
            assert len(r["wall_s"]) == 1 and all(_positive(w) for w in r["wall_s"]), (name, side)
            assert all(0 < t0 < t1 for t0, t1 in r["window_elapsed_s"]), (name, side)
            assert r["metrics_records"] == [records], (name, side)
            assert all(math.isfinite(x) for x in r["final_loss"]), (name, side)
        # the same run, trained twice: bit for bit the same losses on CPU with one thread (CUDA
        # kernels with atomics need not be)
        if s["device"] == "cpu":
            assert a["same_losses"] is True, name
        assert len(a["round_ratios"]) == 1 and _positive(a["ratio"]) and _positive(a["ratio_of_medians"])
        assert len(a["extra_ms_per_round"]) == 1 and math.isfinite(a["extra_ms_per_step"])
        assert _positive(a["logging_explains_ms_per_step"])

    targets = {t["arm"]: t for t in data["targets"]}
    assert set(targets) == {"prenorm", "dhc4"}
    for t in targets.values():
        assert t["threshold"] == 1.02 and _positive(t["ratio"]) and isinstance(t["passed"], bool)
        assert t["passed"] == (t["ratio"] <= 1.02)

"""Smoke test of benchmarks/train_throughput.py: --quick runs end to end and writes well-formed JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_throughput_quick(tmp_path):
    out = tmp_path / "train_throughput.json"
    proc = subprocess.run(
        # one torch thread: on a shared machine, OpenMP threads waiting on a descheduled sibling
        # can slow the tiny steps down a hundredfold
        [sys.executable, str(SCRIPT), "--quick", "--rounds", "1", "--steps", "2,6", "--cli-repeats", "1",
         "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DHC x4" in proc.stdout and "prenorm" in proc.stdout and "targets" in proc.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "train_throughput"
    for key in ("platform", "cpu_model", "torch", "torch_threads", "date", "source_digest"):
        assert data["machine"][key], key
    s = data["settings"]
    assert (s["quick"], s["preset"], s["rounds"], s["pathways"]) == (True, "tiny", 1, ["hc", "prenorm"])
    n1, n2 = s["steps"]
    assert (n1, n2) == (2, 6) and s["threads"] == s["threads_flag"] == 1
    assert s["tokens_per_step"] == s["batch_size"] * s["seq_len"] > 0
    assert s["eval_every"] == 0 and s["save_every"] == 0
    assert data["data"]["prepare_s"] > 0 and data["data"]["tokens"]["train"] > 0

    assert set(data["pathways"]) == {"hc", "prenorm"}
    assert data["pathways"]["hc"]["model_config"]["pathway"] == "hc"
    assert data["pathways"]["hc"]["model_config"]["expansion_rate"] == 4
    assert data["pathways"]["prenorm"]["model_config"]["pathway"] == "prenorm"
    for name, p in data["pathways"].items():
        assert p["params"] > 0, name
        for side in ("hyperbit", "bare"):
            r = p[side]
            # raw wall times: one per round for each N
            assert [len(r["wall_s"][str(n)]) for n in (n1, n2)] == [1, 1], (name, side)
            assert all(_positive(w) for ws in r["wall_s"].values() for w in ws), (name, side)
            # the in-run rate does not depend on the difference of two noisy wall times
            assert _positive(r["in_run_step_ms"]) and _positive(r["in_run_tokens_per_s"]), (name, side)
            assert len(r["step_ms_per_round"]) == 1 and math.isfinite(r["step_ms"]), (name, side)
            # the difference estimate is positive unless the shared machine's noise swamped it;
            # then tokens/s is null and a warning says so
            if r["step_ms"] > 0:
                assert _positive(r["tokens_per_s"]), (name, side)
            else:
                assert r["tokens_per_s"] is None and "disagree" in proc.stdout
            assert math.isfinite(r["startup_to_first_step_s"]) and math.isfinite(r["fixed_overhead_s"])
            assert math.isfinite(r["final_loss"][str(n2)]), (name, side)
        assert _positive(p["hyperbit"]["final_eval_save_s"]), name
        assert p["ratio_tokens_per_s"] is None or _positive(p["ratio_tokens_per_s"]), name
        assert _positive(p["in_run_ratio_tokens_per_s"]), name

    cli = data["cli"]
    assert cli["repeats"] == 1 and len(cli["wall_s"]) == 1
    assert _positive(cli["median_s"]) and _positive(cli["import_torch_median_s"])

    targets = {t["pathway"]: t for t in data["targets"]}
    assert set(targets) == {"hc", "prenorm"}
    for t in targets.values():
        assert t["threshold"] == 0.95
        assert t["passed"] is None if t["ratio"] is None else isinstance(t["passed"], bool)

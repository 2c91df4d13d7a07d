"""``benchmarks/decode.py --quick`` runs end to end: the packed model decodes the same greedy tokens
as the BitLinear training form, and the memory columns are the exact byte counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def test_decode_benchmark_quick(tmp_path):
    out = tmp_path / "decode.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "tokens/s" in proc.stdout and "packed" in proc.stdout
    assert set(data["tokens_per_s"]) >= {"packed", "fp32 dense", "BitLinear"}
    # the packed forms compute BitLinear's quantised products: the same greedy tokens
    assert data["same_tokens_as_bitlinear"]["packed"] == 1.0
    assert data["same_tokens_as_bitlinear"].get("packed oneDNN", 1.0) == 1.0
    mem = data["memory"]
    n_linears = 7 * data["shape"]["n_layers"]
    dense = mem["fp32 dense"]["linear_stored_bytes"]
    assert mem["packed"]["linear_stored_bytes"] == dense // 16 + 4 * n_linears  # codes + one fp32 scale each
    assert mem["packed"]["linear_runtime_bytes"] * 4 == dense  # int8 kernel weight: 1 byte per weight
    assert mem["BitLinear"]["linear_stored_bytes"] == dense
    stored = next(t for t in data["targets"] if "1/16" in t["description"])
    assert stored["passed"] is True

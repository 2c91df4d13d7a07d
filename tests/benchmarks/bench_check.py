"""Helpers of the benchmark smoke tests: run a script (through ``planted.py``) and read back the
table it printed."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLANTED = Path(__file__).resolve().parent / "planted.py"


def run(script: str, args: list[str], plan: dict, out: Path, timeout: int = 300) -> tuple[str, dict]:
    """Run ``benchmarks/<script>`` with ``args`` and the planted costs of ``plan``; returns its
    stdout and the JSON it wrote to ``out``."""
    proc = subprocess.run([sys.executable, str(PLANTED), json.dumps(plan), script, *args, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def table(stdout: str, first_header: str) -> list[list[str]]:
    """The body rows of the table whose header line starts with ``first_header`` (cells cut at
    the columns of the dashed line under the header)."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.split("  ")[0].strip() == first_header and set(lines[i + 1]) <= {"-", " "} and lines[i + 1]:
            spans = [m.span() for m in re.finditer(r"-+", lines[i + 1])]
            rows = []
            for row in lines[i + 2:]:
                if len(row) != len(lines[i + 1]):  # every row of format_table has the dashes' width
                    break
                rows.append([row[s:e].strip() for s, e in spans])
            return rows
    raise AssertionError(f"no table with header {first_header!r} in:\n{stdout[-3000:]}")


def median(xs) -> float:
    return statistics.median(list(xs))

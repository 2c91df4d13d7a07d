"""The console script: real output on good input, one line and exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest

from hyperbit.cli import main


def test_config_prints_resolved_json(capsys):
    assert main(["config", "--preset", "tiny", "pathway=hc", "expansion_rate=4"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["pathway"] == "hc" and cfg["expansion_rate"] == 4 and cfg["dim"] == 64
    assert cfg["n_kv_heads"] == 2 and cfg["ffn_hidden"] == 192  # preset values, resolved defaults


def test_params_counts_olmo_on_meta(capsys):
    assert main(["params", "--preset", "olmo-1b", "pathway=hc", "expansion_rate=4"]) == 0
    out = capsys.readouterr().out
    assert "1,177,226,048 parameters" in out
    assert "12,314 x 32 branches" in out  # d(n+2) + n(n+2) + 2 = 2048*6 + 24 + 2


def test_wiring_passes_for_shipped_pathway(capsys):
    assert main(["wiring", "--preset", "tiny", "pathway=parallel", "expansion_rate=2"]) == 0
    assert "wiring check: PASS" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["config", "expansion_rate=0"], "expansion_rate must be >= 1"),
    (["params", "dimm=3"], "unknown model config key 'dimm'"),
    (["config", "pathway=resnet"], "choose one of ['prenorm', 'postnorm', 'hc'"),
    (["config", "dim"], "must look like key=value"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err

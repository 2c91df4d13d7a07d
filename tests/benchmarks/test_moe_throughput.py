"""Smoke test of benchmarks/moe_throughput.py: --quick runs the real models end to end, and every
number it reports follows from planted step costs on a clock that only moves when told (so the
medians, ratios, table cells and the verdict are checked exactly)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest

import hyperbit
from bench_check import REPO, table

BENCH = REPO / "benchmarks"


def load():
    sys.path.insert(0, str(BENCH))
    import _common

    spec = importlib.util.spec_from_file_location("moe_throughput", BENCH / "moe_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, _common


@pytest.mark.parametrize("moe_ms,passed", [(12.5, True), (20.0, False)])
def test_moe_throughput_quick(tmp_path, monkeypatch, capsys, moe_ms, passed):
    mod, C = load()
    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    costs = {"dense": [0.010, 0.010, 0.010, 0.010, 0.014], "moe": [moe_ms / 1e3], "moe-loop": [0.030]}
    calls = {name: 0 for name in costs}
    make_step = C.make_train_step

    def planted(model, *a, **kw):
        real, name = make_step(model, *a, **kw), model.bench_name

        def step():
            real()
            plan = costs[name]
            now[0] += plan[min(calls[name], len(plan) - 1)]
            calls[name] += 1
        return step

    monkeypatch.setattr(C, "make_train_step", planted)
    out_path = tmp_path / "moe.json"
    assert mod.main(["--quick", "--rounds", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
                     "--out", str(out_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_path.read_text())
    assert data["benchmark"] == "moe_throughput" and data["machine"]["torch_threads"] == 1
    s = data["settings"]
    assert (s["rounds"], s["steps"], s["warmup"], s["quick"]) == (2, 2, 1, True)
    assert s["tokens_per_step"] == s["batch"] * s["seq_len"] == 64
    assert calls == {name: 1 + 2 * 2 for name in costs}  # warm-up, then rounds x steps

    models = data["models"]
    dense, moe, loop = models["dense"], models["moe"], models["moe-loop"]
    # same shape; dense width = top_k * expert width, so the active counts differ by the router
    assert dense["model_config"]["ffn_hidden"] == s["top_k"] * s["expert_hidden"]
    assert moe["model_config"]["ffn"] == "moe" and moe["model_config"]["moe_experts"] == s["experts"]
    for name, m in models.items():
        cfg = hyperbit.ModelConfig.from_dict(m["model_config"])
        assert m["params"] == hyperbit.count_params(cfg) and m["active_params"] == hyperbit.count_params(cfg, active=True)
    assert moe["active_params"] - dense["active_params"] == s["n_layers"] * s["dim"] * s["experts"]
    # timings: exactly the planted costs (warm-up excluded), medians over all timed steps
    assert dense["step_ms_per_round"] == [pytest.approx([10.0, 10.0]), pytest.approx([10.0, 14.0])]
    assert dense["step_ms"] == pytest.approx(10.0) and moe["step_ms"] == pytest.approx(moe_ms)
    assert loop["step_ms"] == pytest.approx(30.0)
    assert dense["tokens_per_s"] == pytest.approx(64 / 0.010)
    assert moe["ratio_vs_dense"] == pytest.approx(10.0 / moe_ms) and loop["ratio_vs_dense"] == pytest.approx(1 / 3)
    (target,) = data["targets"]
    assert target["threshold"] == 0.7 and target["ratio"] == moe["ratio_vs_dense"] and target["passed"] is passed
    assert f"[{'PASS' if passed else 'FAIL'}]" in out
    # the printed table holds the JSON's numbers
    rows = {r[0]: r for r in table(out, "model")}
    assert set(rows) == {"dense", "moe", "moe-loop"}
    for name, m in models.items():
        assert rows[name][1:] == [f"{m['params']:,}", f"{m['active_params']:,}", f"{m['step_ms']:.2f}",
                                  f"{m['step_ms_summary']['p25']:.2f}", f"{m['step_ms_summary']['p75']:.2f}",
                                  f"{m['tokens_per_s']:,.0f}", f"{m['ratio_vs_dense']:.3f}"]
    # the loop reference and the batched dispatch compute the same loss on the same weights
    assert data["loss_check"]["moe"] == pytest.approx(data["loss_check"]["moe-loop"], rel=1e-5)

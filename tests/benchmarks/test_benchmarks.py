"""Smoke tests of the benchmark scripts: they run end to end on the real models, and the numbers
they report are the numbers they measured. Timings come from planted costs on a clock that only
moves when told (``planted.py``), so every median, ratio, table cell and verdict is checked
exactly, and a planted-slow configuration has to show up as the slow one and fail its target."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import hyperbit
from bench_check import REPO, run, table
from hyperbit.reports.compare.grid import arm_overrides
from hyperbit.train import resolve_run_config

MIB = 1024 * 1024


@pytest.mark.slow  # ~15 s: in the slow run
def test_pathway_overhead_quick(tmp_path):
    # Planted step costs, per call: 1 warm-up, then 2 rounds x 2 steps (the order rotates, round
    # 2 runs dhc4 first). prenorm: 4 ms, its last step 12 ms; DHC x4: 10 ms in round 1, 20 ms in 2.
    plan = {"clock": True, "step": {"prenorm": [0.004, 0.004, 0.004, 0.004, 0.012],
                                    "dhc4": [0.010, 0.010, 0.010, 0.020, 0.020]}}
    out, data = run("pathway_overhead.py", ["--quick", "--rounds", "2", "--steps", "2", "--warmup", "1",
                                            "--configs", "prenorm,dhc4"], plan, tmp_path / "po.json")
    assert "DHC x4" in out and "targets" in out

    assert data["benchmark"] == "pathway_overhead"
    for key in ("platform", "cpu_model", "torch", "torch_threads", "date"):
        assert data["machine"][key], key
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["torch_threads"] == 2
    s = data["settings"]
    assert (s["rounds"], s["steps"], s["warmup"], s["quick"], s["threads"]) == (2, 2, 1, True, 2)
    assert (s["seq_len"], s["batch_size"], s["model_overrides"]) == (64, 2, {"dim": 64, "n_layers": 2, "max_seq_len": 64})

    assert set(data["configs"]) == {"prenorm", "dhc4"}
    base, dhc = data["configs"]["prenorm"], data["configs"]["dhc4"]
    for name, c in data["configs"].items():
        cfg = hyperbit.ModelConfig.from_dict(c["model_config"])
        assert (cfg.dim, cfg.n_layers, cfg.max_seq_len) == (64, 2, 64), name  # --quick's model
        assert c["params"] == hyperbit.count_params(cfg) > 0, name
    assert base["model_config"]["pathway"] == "prenorm"
    assert (dhc["model_config"]["pathway"], dhc["model_config"]["expansion_rate"],
            dhc["model_config"]["hc_dynamic"]) == ("hc", 4, True)

    # step times: exactly the planted costs, per round and step
    assert base["step"]["raw_ms_per_round"] == [pytest.approx([4.0, 4.0]), pytest.approx([4.0, 12.0])]
    assert dhc["step"]["raw_ms_per_round"] == [pytest.approx([10.0, 10.0]), pytest.approx([20.0, 20.0])]
    assert base["step"]["median_ms"] == pytest.approx(4.0) and dhc["step"]["median_ms"] == pytest.approx(15.0)
    assert base["step"]["summary_ms"]["mean"] == pytest.approx(6.0)
    assert base["step"]["summary_ms"]["p75"] == pytest.approx(6.0)
    assert base["step"]["ratio_vs_prenorm"] == 1.0
    assert dhc["step"]["ratio_vs_prenorm"] == pytest.approx(15 / 4)  # median over median
    assert dhc["step"]["paired_round_ratio_median"] == pytest.approx(2.5)  # round by round: 10 / 4, 20 / 8

    # memory and saved activations: the reported MiB and ratios are the measured bytes
    for c in (base, dhc):
        mem, act = c["peak_memory"], c["saved_activations"]
        assert mem["mib"] == pytest.approx(mem["peak_step_bytes"] / MIB) and mem["peak_step_bytes"] > 0
        assert mem["warm_mib"] == pytest.approx(mem["peak_step_warm_bytes"] / MIB)
        assert mem["ratio_vs_prenorm"] == pytest.approx(mem["peak_step_bytes"] / base["peak_memory"]["peak_step_bytes"])
        assert mem["warm_ratio_vs_prenorm"] == pytest.approx(
            mem["peak_step_warm_bytes"] / base["peak_memory"]["peak_step_warm_bytes"])
        assert act["mib"] == pytest.approx(act["bytes"] / MIB)
        assert act["ratio_vs_prenorm"] == pytest.approx(act["bytes"] / base["saved_activations"]["bytes"])
    assert base["step"]["ratio_vs_prenorm"] == base["peak_memory"]["ratio_vs_prenorm"] == 1.0
    assert base["saved_activations"]["ratio_vs_prenorm"] == 1.0
    # saved activations are exact: the same count here, and four streams save more than one
    sys.path.insert(0, str(REPO / "benchmarks"))
    import pathway_overhead as po

    settings = po.settings(po.parse_args(["--quick"]))
    idx, targets = po.make_batch(po.model_config("prenorm", settings).vocab_size, settings)
    for name, c in data["configs"].items():
        model = po.build(name, settings)

        def fwd(model=model):
            with po.C.autocast("cpu"):
                return model(idx, targets)[1]

        assert po.C.saved_activation_bytes(model, fwd, exclude=[idx, targets]) == {
            k: c["saved_activations"][k] for k in ("bytes", "storages", "saved_tensors")}, name
    assert dhc["saved_activations"]["bytes"] > base["saved_activations"]["bytes"]

    # the printed table is the JSON
    rows = table(out, "config")
    assert [r[0] for r in rows] == ["prenorm (fp)", "DHC x4"]
    for row, c in zip(rows, (base, dhc)):
        mem, act = c["peak_memory"], c["saved_activations"]
        assert row[1:] == [f"{c['step']['median_ms']:.2f}", f"{c['step']['ratio_vs_prenorm']:.3f}",
                           f"{mem['mib']:.1f}", f"{mem['ratio_vs_prenorm']:.3f}", f"{act['mib']:.1f}",
                           f"{act['ratio_vs_prenorm']:.3f}", f"{mem['warm_mib']:.1f}",
                           f"{mem['warm_ratio_vs_prenorm']:.3f}"]
    assert rows[1][1:3] == ["15.00", "3.750"]

    # the planted-slow DHC x4 fails its step target; the verdicts follow the ratios
    targets = {t["name"]: t for t in data["targets"]}
    assert set(targets) == {"dhc4_step", "dhc4_peak_memory", "bitlinear_step"}
    assert targets["dhc4_step"]["ratio"] == pytest.approx(15 / 4) and targets["dhc4_step"]["passed"] is False
    assert "[FAIL] DHC x4 step time <= 1.10x prenorm: 3.750x" in out
    peak = targets["dhc4_peak_memory"]
    assert peak["ratio"] == dhc["peak_memory"]["ratio_vs_prenorm"] and peak["passed"] is (peak["ratio"] <= 1.30)
    assert targets["bitlinear_step"]["passed"] is None  # prenorm_bitnet was not run


@pytest.mark.slow  # ~15 s: in the slow run
def test_inspect_time_smoke(tmp_path):
    # the inspect command (really run) is planted at 45 s, `import torch` at 2 s, the analysis
    # at 0.25 s: over the 30 s target
    plan = {"clock": True, "command": {"hyperbit.cli inspect": 45.0, "import torch": 2.0}, "analysis": 0.25}
    out, data = run("inspect_time.py", ["--repeats", "1", "--steps", "2"], plan, tmp_path / "it.json")
    assert "hyperbit inspect (whole command)" in out and "targets" in out
    assert data["benchmark"] == "inspect_time" and data["settings"]["repeats"] == 1
    assert data["settings"]["steps"] == 2
    tiny = resolve_run_config("tiny", [])
    assert data["settings"]["batch"] == [8, tiny.train.seq_len]
    assert (data["settings"]["model"]["pathway"], data["settings"]["model"]["expansion_rate"]) == ("hc", 2)
    for key, planted in (("command_s", 45.0), ("import_torch_s", 2.0), ("analysis_s", 0.25)):
        summary = data[key]
        assert summary["n"] == 1 and summary["median"] > 0, key
        for stat in ("median", "min", "max", "mean"):
            assert summary[stat] == pytest.approx(planted), (key, stat)
    assert data["command_s"]["median"] > data["analysis_s"]["median"]  # start-up and plots on top
    assert data["targets"][0]["passed"] is (data["command_s"]["median"] < 30.0)
    assert data["targets"][0]["ratio"] == pytest.approx(45.0 / 30.0) and data["targets"][0]["passed"] is False
    assert "[FAIL] hyperbit inspect wall time / 30 s: 1.500x" in out
    assert table(out, "") == [["hyperbit inspect (whole command)", "45.00 s", "45.00", "45.00"],
                              ['python -c "import torch"', "2.00 s", "2.00", "2.00"],
                              ["analysis only, in-process", "0.250 s", "0.250", "0.250"]]


def test_monitor_cost_smoke(tmp_path):
    steps = {"prenorm": 0.004, "postnorm": 0.004, "shc4": 0.008, "dhc2": 0.008, "dhc4": 0.010}
    monitors = {"prenorm": 0.002, "postnorm": 0.002, "shc4": 0.003, "dhc2": 0.003, "dhc4": 2.0}  # dhc4: slow
    plan = {"clock": True, "step": {k: [v] for k, v in steps.items()}, "monitor": {k: [v] for k, v in monitors.items()}}
    out, data = run("monitor_cost.py", ["--preset", "tiny", "--rounds", "1", "--steps", "1", "--threads", "1"],
                    plan, tmp_path / "mc.json")
    assert "monitor/step" in out and "targets" in out
    assert data["benchmark"] == "monitor_cost" and set(data["pathways"]) == {"prenorm", "postnorm", "shc4", "dhc2", "dhc4"}
    assert data["settings"] == {"preset": "tiny", "rounds": 1, "steps": 1}
    assert data["machine"]["torch_threads"] == 1
    rows = {r[0]: r[1:] for r in table(out, "pathway")}
    assert list(rows) == list(data["pathways"])
    for name, p in data["pathways"].items():
        cfg = resolve_run_config("tiny", arm_overrides(name))
        assert p["model"] == cfg.model.to_dict(), name
        assert p["monitor_every"] == cfg.train.monitor_every > 0, name
        assert p["batch"] == [cfg.train.batch_size // cfg.train.grad_accum, cfg.train.seq_len]
        assert p["monitor_batch"] == [2, cfg.train.seq_len]
        assert p["step_ms"] == pytest.approx(1e3 * steps[name]) and p["monitor_ms"] == pytest.approx(1e3 * monitors[name])
        assert p["raw_s"]["step"] == [[pytest.approx(steps[name])]]
        assert p["raw_s"]["monitor"] == [[pytest.approx(monitors[name])]]
        assert p["step_ms"] > 0 and p["monitor_ms"] > 0, name
        assert p["monitor_share"] == pytest.approx(p["monitor_ms"] / (p["monitor_every"] * p["step_ms"]))
        assert rows[name] == [f"{p['step_ms']:.1f}", f"{p['monitor_ms']:.1f}", f"{p['monitor_ms'] / p['step_ms']:.2f}x",
                              str(p["monitor_every"]), f"{100 * p['monitor_share']:.3f}%"]
    assert [t["passed"] for t in data["targets"]] == [p["monitor_share"] < 0.01 for p in data["pathways"].values()]
    assert [t["passed"] for t in data["targets"]] == [True, True, True, True, False]  # the planted-slow monitor
    assert [t["ratio"] for t in data["targets"]] == [pytest.approx(p["monitor_share"] / 0.01)
                                                    for p in data["pathways"].values()]
    every = data["pathways"]["dhc4"]["monitor_every"]
    assert f"[FAIL] monitor share of training time (dhc4) / 1%: {2.0 / (every * 0.010) / 0.01:.3f}x" in out
    assert all(math.isfinite(t["ratio"]) for t in data["targets"])


def test_sinkhorn_quick(tmp_path):
    """Real timings (nothing planted): the table, the JSON and the verdict agree with each other,
    and the in-script log-domain reference gives hyperbit's matrices."""
    out, data = run("sinkhorn.py", ["--quick", "--threads", "1"], {}, tmp_path / "sk.json")
    med = data["median_s"]
    assert set(med) == {"log-domain", "scaling", "log-domain recompute", "scaling recompute", "hyperbit"}
    assert all(v > 0 for v in med.values())
    assert data["max_abs_difference"] < 1e-5
    (target,) = data["targets"]
    assert target["ratio"] == pytest.approx(med["hyperbit"] / med["log-domain recompute"])
    assert target["passed"] == (target["ratio"] <= 0.75)
    rows = {r[0]: r for r in table(out, "implementation")}
    assert float(rows["hyperbit"][1]) == pytest.approx(1e3 * med["hyperbit"], abs=0.006)
    assert float(rows["hyperbit"][2]) == pytest.approx(med["hyperbit"] / med["log-domain"], abs=6e-4)
    assert data["settings"]["tokens"] == 64 and data["machine"]["torch_threads"] == 1


def test_hc_kernels_quick(tmp_path):
    """Real timings: the calls per step show the fused depth backward (one depth backward kernel
    call per step left, for the last connection, against one per connection unfused), and the
    table, the JSON and the verdict agree."""
    out, data = run("hc_kernels.py", ["--quick", "--threads", "1"], {}, tmp_path / "hk.json")
    calls, med = data["calls_per_step"], data["median_s"]
    assert calls["unfused-depth"]["depth_backward"] == 4 and calls["base"]["depth_backward"] == 1
    assert calls["unfused-depth"]["hc_backward"] == calls["base"]["hc_backward"] == 4
    (target,) = data["targets"]
    assert target["ratio"] == pytest.approx(med["base"]["all kernels"] / med["unfused-depth"]["all kernels"])
    assert target["passed"] == (target["ratio"] <= 1.0)
    rows = {r[0]: r for r in table(out, "kernel")}
    assert rows["depth_backward"][1:3] == ["4", "1"]
    assert float(rows["hc_backward"][3]) == pytest.approx(1e3 * med["unfused-depth"]["hc_backward"], abs=0.006)
    assert float(rows["step"][4]) == pytest.approx(1e3 * med["base"]["step"], abs=0.006)
    assert data["settings"]["variants"] == ["unfused-depth", "base"]


def test_hc_kernels_refuses_a_variant_against_itself():
    """A,A would fold into one set of rounds and print identical columns as if measured twice."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "hc_kernels.py"), "--variants",
                             "base,base", "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "two different variants" in result.stderr


def test_hc_kernels_isolated_quick(tmp_path):
    out, data = run("hc_kernels.py", ["--isolated", "--quick", "--threads", "1", "--calls", "3"], {}, tmp_path / "hi.json")
    ms = data["median_ms"]
    assert set(ms) == {"width forward (DHC)", "width backward, bf16 copy", "width backward, rebuilt",
                       "rebuild (depth forward)", "depth backward"} and all(v > 0 for v in ms.values())
    rows = {r[0]: r for r in table(out, "kernel")}
    assert float(rows["depth backward"][1]) == pytest.approx(ms["depth backward"], abs=6e-4)
    assert data["settings"]["calls"] == 3


@pytest.mark.slow  # ~20 s (four processes): in the slow run
def test_cpu_allocator_quick(tmp_path):
    """Real processes, one per setting: the kept one applied the settings (with glibc), the
    default one did not, and the table, the JSON and the verdicts agree."""
    from hyperbit.train import allocator

    out, data = run("cpu_allocator.py", ["--quick", "--models", "prenorm,mhc4", "--threads", "1"], {},
                    tmp_path / "ca.json")
    res = data["results"]
    assert set(res) == {"prenorm", "mhc4"}
    for name, r in res.items():
        assert [x["kept"] for x in r["runs"]["kept"]] == [allocator._glibc() is not None]
        assert [x["kept"] for x in r["runs"]["default"]] == [False]
        kept, default = r["runs"]["kept"][0], r["runs"]["default"][0]
        assert r["step_ratio_paired"] == pytest.approx(kept["step_s"] / default["step_s"])
        rows = [row for row in table(out, "model") if row[0] == ("Pre-Norm" if name == "prenorm" else "mHC x4")]
        assert [row[1] for row in rows] == ["kept", "default"]
        assert float(rows[0][2]) == pytest.approx(1e3 * kept["step_s"], abs=0.06)
        assert float(rows[0][5]) == pytest.approx(r["step_ratio_paired"], abs=6e-4)
    verdicts = {t["name"]: t["passed"] for t in data["targets"]}
    assert verdicts["mhc4_step"] == (res["mhc4"]["step_ratio_paired"] <= 1.0)
    assert set(verdicts) == {"prenorm_faults", "prenorm_step", "mhc4_faults", "mhc4_step"}


@pytest.mark.slow  # ~30 s (compiles): in the slow run
def test_hc_kernels_compiled_quick(tmp_path):
    """``--compiled``: the compiled blocks call mHC's one-pass kernels (base) or HC's mixing
    kernels and the Sinkhorn (pytorch-mhc), once per branch and step each."""
    out, data = run("hc_kernels.py", ["--quick", "--threads", "1", "--compiled", "--model", "mhc4", "--variants",
                                      "pytorch-mhc,base"], {}, tmp_path / "hkc.json")
    calls = data["calls_per_step"]
    assert calls["base"]["mhc_forward"] == calls["base"]["mhc_backward_fused"] == 4
    assert "hc_backward" not in calls["base"] and "mhc_forward" not in calls["pytorch-mhc"]
    assert calls["pytorch-mhc"]["hc_forward"] == calls["pytorch-mhc"]["sinkhorn"] == 4
    assert data["settings"]["compiled"] is True and "mHC x4 compiled" in out

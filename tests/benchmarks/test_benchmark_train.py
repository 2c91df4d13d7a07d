"""Smoke test of benchmarks/train_throughput.py: --quick runs end to end, runs exactly the steps
its options ask for, and every number it reports follows from the times it measured. The bare
loop's model is planted slow (a 20 ms sleep before each forward), which its in-run step time must
show."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hyperbit
from bench_check import run, table
from hyperbit.data import prepare
from hyperbit.train import resolve_run_config

SLEEP = 0.02


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_throughput_quick(tmp_path):
    record = tmp_path / "calls.json"
    # one torch thread: on a shared machine, OpenMP threads waiting on a descheduled sibling
    # can slow the tiny steps down a hundredfold
    out, data = run("train_throughput.py", ["--quick", "--rounds", "1", "--steps", "2,6", "--cli-repeats", "1",
                                            "--threads", "1"],
                    {"bare_forward_sleep": SLEEP, "record": str(record)}, tmp_path / "tt.json", timeout=120)
    assert "DHC x4" in out and "prenorm" in out and "targets" in out

    assert data["benchmark"] == "train_throughput"
    for key in ("platform", "cpu_model", "torch", "torch_threads", "date", "source_digest"):
        assert data["machine"][key], key
    assert data["machine"]["torch"] == torch.__version__
    tiny = resolve_run_config("tiny", [])
    s = data["settings"]
    assert (s["quick"], s["preset"], s["rounds"], s["pathways"]) == (True, "tiny", 1, ["hc", "prenorm"])
    n1, n2 = s["steps"]
    assert (n1, n2) == (2, 6) and s["threads"] == s["threads_flag"] == 1 and s["cli_repeats"] == 1
    assert (s["batch_size"], s["seq_len"], s["grad_accum"]) == (tiny.train.batch_size, tiny.train.seq_len,
                                                                 tiny.train.grad_accum)
    assert (s["log_every"], s["eval_batches"], s["data_max_bytes"]) == (tiny.train.log_every, tiny.train.eval_batches,
                                                                        tiny.data.max_bytes)
    assert s["tokens_per_step"] == s["batch_size"] * s["seq_len"] > 0
    assert s["eval_every"] == 0 and s["save_every"] == 0
    assert data["data"]["prepare_s"] > 0 and data["data"]["tokens"]["train"] > 0
    # the data it prepared is the preset's corpus
    assert data["data"]["tokens"] == prepare("pystdlib", tmp_path / "d", max_bytes=tiny.data.max_bytes)["tokens"]

    # it ran what the options say: per pathway, train() for N1 (warm-up), N1 and N2 steps, and the
    # bare loop's model for as many steps (each forward counted by the planted sleep)
    calls = json.loads(record.read_text())
    assert sorted(calls["train"]) == sorted([[k, n, tiny.train.log_every] for k in ("dhc4", "prenorm")
                                             for n in (n1, n1, n2)])
    assert calls["dhc4/bare_forward"] == calls["prenorm/bare_forward"] == (n1 + n1 + n2) * s["grad_accum"]

    assert set(data["pathways"]) == {"hc", "prenorm"}
    assert data["pathways"]["hc"]["model_config"]["pathway"] == "hc"
    assert data["pathways"]["hc"]["model_config"]["expansion_rate"] == 4
    assert data["pathways"]["hc"]["model_config"]["hc_dynamic"] is True
    assert data["pathways"]["prenorm"]["model_config"]["pathway"] == "prenorm"
    rows = table(out, "pathway")
    assert [(r[0], r[1]) for r in rows] == [("DHC x4", "hyperbit"), ("DHC x4", "bare"),
                                            ("prenorm", "hyperbit"), ("prenorm", "bare")]
    row = iter(rows)
    for name, p in data["pathways"].items():
        assert p["params"] == hyperbit.count_params(hyperbit.ModelConfig.from_dict(p["model_config"])) > 0, name
        for side in ("hyperbit", "bare"):
            r = p[side]
            # raw wall times: one per round for each N
            assert [len(r["wall_s"][str(n)]) for n in (n1, n2)] == [1, 1], (name, side)
            assert all(_positive(w) for ws in r["wall_s"].values() for w in ws), (name, side)
            # the steady step is the difference of the two wall times, and everything follows from it
            (t1,), (t2,) = r["wall_s"][str(n1)], r["wall_s"][str(n2)]
            step_s = (t2 - t1) / (n2 - n1)
            assert r["step_ms"] == pytest.approx(step_s * 1e3) and r["step_ms_per_round"] == [pytest.approx(step_s * 1e3)]
            assert r["step_ms_summary"]["median"] == pytest.approx(r["step_ms"])
            assert r["fixed_overhead_s"] == pytest.approx(t1 - n1 * step_s)
            # the in-run rate does not depend on the difference of two noisy wall times
            assert _positive(r["in_run_step_ms"]) and _positive(r["in_run_tokens_per_s"]), (name, side)
            assert r["in_run_tokens_per_s"] == pytest.approx(s["tokens_per_step"] / (r["in_run_step_ms"] / 1e3))
            assert r["difference_vs_in_run"] == pytest.approx(r["step_ms"] / r["in_run_step_ms"])
            assert len(r["step_ms_per_round"]) == 1 and math.isfinite(r["step_ms"]), (name, side)
            # the difference estimate is positive unless the shared machine's noise swamped it;
            # then tokens/s is null and a warning says so
            if r["step_ms"] > 0:
                assert r["tokens_per_s"] == pytest.approx(s["tokens_per_step"] / step_s)
            else:
                assert r["tokens_per_s"] is None and "disagree" in out
            assert math.isfinite(r["startup_to_first_step_s"]) and math.isfinite(r["fixed_overhead_s"])
            assert math.isfinite(r["final_loss"][str(n2)]), (name, side)
            fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
            hb = side == "hyperbit"
            assert next(row)[2:] == [
                fmt(r["step_ms"], ".2f"), fmt(r["step_relative_iqr"], ".3f"), fmt(r["tokens_per_s"], ",.0f"),
                fmt(p["ratio_tokens_per_s"], ".3f") if hb else "1.000", fmt(r["in_run_tokens_per_s"], ",.0f"),
                fmt(p["in_run_ratio_tokens_per_s"], ".3f") if hb else "1.000",
                fmt(r["startup_to_first_step_s"], ".3f"), fmt(r["fixed_overhead_s"], ".3f")], (name, side)
        # the planted sleep shows in the bare loop's in-run step time
        assert p["bare"]["in_run_step_ms"] >= 1e3 * SLEEP * s["grad_accum"], name
        assert _positive(p["hyperbit"]["final_eval_save_s"]), name
        hb_tok, bare_tok = p["hyperbit"]["tokens_per_s"], p["bare"]["tokens_per_s"]
        assert p["ratio_tokens_per_s"] == (None if hb_tok is None or bare_tok is None else pytest.approx(hb_tok / bare_tok))
        assert p["in_run_ratio_tokens_per_s"] == pytest.approx(p["hyperbit"]["in_run_tokens_per_s"]
                                                               / p["bare"]["in_run_tokens_per_s"])
        hb_step, bare_step = p["hyperbit"]["step_ms"], p["bare"]["step_ms"]
        assert p["paired_round_ratios"] == ([pytest.approx(bare_step / hb_step)] if hb_step > 0 and bare_step > 0 else [])

    cli = data["cli"]
    assert cli["repeats"] == 1 and len(cli["wall_s"]) == 1 and len(cli["import_torch_wall_s"]) == 1
    assert cli["median_s"] == cli["wall_s"][0] > 0 and cli["import_torch_median_s"] == cli["import_torch_wall_s"][0] > 0
    assert f"{cli['median_s']:.3f}s (median of 1; `python -c 'import torch'` {cli['import_torch_median_s']:.3f}s)" in out

    targets = {t["pathway"]: t for t in data["targets"]}
    assert set(targets) == {"hc", "prenorm"}
    for name, t in targets.items():
        assert t["threshold"] == 0.95 and t["ratio"] == data["pathways"][name]["ratio_tokens_per_s"]
        assert t["passed"] is None if t["ratio"] is None else t["passed"] is (t["ratio"] >= 0.95)

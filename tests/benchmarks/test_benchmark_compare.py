"""Smoke test of benchmarks/compare_overhead.py: --quick runs end to end, trains exactly the runs
its options ask for, and every ratio, difference and table cell it reports follows from the step
times it measured."""

from __future__ import annotations

import json
import math

import pytest

import hyperbit
from bench_check import median, run, table
from hyperbit.data import prepare
from hyperbit.reports.compare.grid import arm_overrides
from hyperbit.train import resolve_run_config


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # ~15 s: in the slow run
def test_compare_overhead_quick(tmp_path):
    record = tmp_path / "calls.json"
    # one torch thread: on a shared machine, OpenMP threads waiting on a descheduled sibling
    # can slow the tiny steps down a hundredfold
    out, data = run("compare_overhead.py", ["--quick", "--rounds", "1", "--threads", "1"], {"record": str(record)},
                    tmp_path / "compare_overhead.json", timeout=120)
    assert "prenorm" in out and "dhc4" in out and "targets" in out
    assert "one metrics line" in out

    assert data["benchmark"] == "compare_overhead"
    for key in ("platform", "cpu_model", "torch", "torch_threads", "date", "source_digest"):
        assert data["machine"][key], key
    tiny = resolve_run_config("tiny", [])
    s = data["settings"]
    assert (s["quick"], s["preset"], s["rounds"], s["arms"]) == (True, "tiny", 1, ["prenorm", "dhc4"])
    assert s["threads"] == s["threads_flag"] == 1
    assert s["log_every"] == {"train": 5, "compare": 1} and tiny.train.log_every == 5
    steps, window = s["steps"], s["window"]
    assert steps == 15  # --quick's default
    assert window == {"from_step": 5, "to_step": steps}  # the first multiple of log_every at or after 5
    assert s["warmup_run_steps"] == min(steps, 2 * window["from_step"])
    assert s["tokens_per_step"] == s["batch_size"] * s["seq_len"] > 0
    assert (s["batch_size"], s["seq_len"], s["seed"]) == (tiny.train.batch_size, tiny.train.seq_len, tiny.train.seed)
    assert (s["eval_every"], s["save_every"], s["monitor_every"], s["eval_batches"]) == (
        tiny.train.eval_every, tiny.train.save_every, tiny.train.monitor_every, tiny.train.eval_batches)
    assert s["target_ratio"] == 1.02 and s["metrics_line_repeats"] == 2000
    assert data["data"]["prepare_s"] > 0 and data["data"]["tokens"]["train"] > 0
    assert data["data"]["tokens"] == prepare(tiny.data.path, tmp_path / "d", max_bytes=tiny.data.max_bytes)["tokens"]

    # it trained what it says: per arm, train() and the compare grid each ran a warm-up run and
    # one run per round, with the same steps and their own logging cadence
    calls = json.loads(record.read_text())
    for arm in ("prenorm", "dhc4"):
        assert [c for c in calls["train"] if c[0] == arm] == [[arm, s["warmup_run_steps"], 5], [arm, steps, 5]]
        assert [c for c in calls["run_grid"] if c[0] == arm] == [[arm, s["warmup_run_steps"], 1], [arm, steps, 1]]

    line = data["metrics_line"]
    assert _positive(line["us"]) and len(line["us_per_batch"]) == line["batches"] == 5
    assert all(_positive(x) for x in line["us_per_batch"])
    assert line["us"] == pytest.approx(median(line["us_per_batch"]))
    assert line["repeats"] == 2000 and line["record_bytes"] == len(json.dumps(line["record"])) + 1
    assert "elapsed_s" in line["record"] and line["record"]["step"] == steps  # the last line of a compare run
    assert f"of a {line['record_bytes']}-byte record): {line['us']:.2f} us (median of 5 x 2000)" in out

    arms = data["arms"]
    assert set(arms) == {"prenorm", "dhc4"}
    assert arms["prenorm"]["model_config"]["pathway"] == "prenorm"
    assert arms["dhc4"]["model_config"]["pathway"] == "hc"
    assert arms["dhc4"]["model_config"]["expansion_rate"] == 4
    assert arms["dhc4"]["model_config"]["hc_dynamic"] is True
    rows = {r[0]: r[1:] for r in table(out, "arm")}
    assert list(rows) == ["prenorm", "dhc4"]
    span = window["to_step"] - window["from_step"]
    for name, a in arms.items():
        assert a["model_config"] == resolve_run_config("tiny", arm_overrides(name)).model.to_dict(), name
        assert a["params"] == hyperbit.count_params(hyperbit.ModelConfig.from_dict(a["model_config"])) > 0, name
        # the two sides' configs differ in the logging cadence and nothing else
        assert a["config_difference"] == {"train.log_every": [5, 1]}, name
        for side, records in (("train", math.ceil(steps / 5)), ("compare", steps)):
            r = a[side]
            assert len(r["step_ms_per_round"]) == 1 and _positive(r["step_ms"]), (name, side)
            # the steady step is the elapsed time across the window, over its steps
            assert r["step_ms_per_round"] == [pytest.approx((t1 - t0) / span * 1e3) for t0, t1 in r["window_elapsed_s"]]
            assert r["step_ms"] == pytest.approx(median(r["step_ms_per_round"]))
            assert r["step_ms_summary"]["median"] == pytest.approx(r["step_ms"])
            assert r["tokens_per_s"] == pytest.approx(s["tokens_per_step"] / (r["step_ms"] / 1e3))
            assert len(r["wall_s"]) == 1 and all(_positive(w) for w in r["wall_s"]), (name, side)
            assert all(0 < t0 < t1 < w for (t0, t1), w in zip(r["window_elapsed_s"], r["wall_s"])), (name, side)
            assert r["metrics_records"] == [records], (name, side)
            assert all(math.isfinite(x) for x in r["final_loss"]), (name, side)
        # the same run, trained twice: bit for bit the same losses on CPU with one thread (CUDA
        # kernels with atomics need not be)
        if s["device"] == "cpu":
            assert a["same_losses"] is True, name
        assert a["same_losses"] == (a["train"]["final_loss"] == a["compare"]["final_loss"])
        t, c = a["train"]["step_ms_per_round"], a["compare"]["step_ms_per_round"]
        assert a["round_ratios"] == [pytest.approx(ci / ti) for ti, ci in zip(t, c)]
        assert a["ratio"] == pytest.approx(median(a["round_ratios"])) and _positive(a["ratio"])
        assert a["ratio_of_medians"] == pytest.approx(a["compare"]["step_ms"] / a["train"]["step_ms"])
        assert a["extra_ms_per_round"] == [pytest.approx(ci - ti) for ti, ci in zip(t, c)]
        assert a["extra_ms_per_step"] == pytest.approx(median(a["extra_ms_per_round"]))
        assert a["logging_explains_ms_per_step"] == pytest.approx(line["us"] * (1 - 1 / 5) / 1e3)
        assert rows[name] == [f"{a['train']['step_ms']:.3f}", f"{a['compare']['step_ms']:.3f}",
                              f"{a['extra_ms_per_step']:+.3f}", f"{a['ratio']:.4f}",
                              f"{min(a['round_ratios']):.3f}-{max(a['round_ratios']):.3f}",
                              f"{a['logging_explains_ms_per_step']:.4f}"], name

    targets = {t["arm"]: t for t in data["targets"]}
    assert set(targets) == {"prenorm", "dhc4"}
    for name, t in targets.items():
        assert t["threshold"] == 1.02 and t["ratio"] == arms[name]["ratio"]
        assert t["passed"] == (t["ratio"] <= 1.02)
        assert f"[{'PASS' if t['passed'] else 'FAIL'}] compare step time <= 1.02x train() step ({name}): " \
               f"{t['ratio']:.3f}x" in out

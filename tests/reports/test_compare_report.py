"""The compare report on synthetic runs with known answers: written as real run directories and
read back with load_run (partial last line included), then checked against hand-computed numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hyperbit.reports.compare.report import analyse, load_run, write_report

BATCH, SEQ = 4, 8  # tokens per step: 32


def make_run(tmp_path, name, arm, seed, loss, *, steps=200, log_every=1, evals=None, stop_at=None,
             monitor=None, partial=True, **model):
    """Write a run directory: ``loss(step)`` per logged step, ``evals`` = {step: val_loss}, an
    optional monitor record at the end, a truncated last line; ``stop_at`` kills it early."""
    config = {"model": {"dim": 32, "n_layers": 2, "pathway": "prenorm", **model},
              "train": {"steps": steps, "batch_size": BATCH, "seq_len": SEQ, "log_every": log_every,
                        "seed": seed, "lr": 1e-3},
              "data": {"path": "pystdlib"}}
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config))
    evals = {steps: 2.0} if evals is None else evals
    lines = []
    for step in range(1, (stop_at or steps) + 1):
        if step % log_every == 0 or step == steps:
            lines.append({"step": step, "loss": float(loss(step)), "lr": 1e-3, "grad_norm": 1.0,
                          "tokens": step * BATCH * SEQ, "tok_s": 1000.0 + seed, "elapsed_s": step / 10})
        if step in evals:
            lines.append({"step": step, "val_loss": evals[step], "val_bpb": evals[step] / math.log(2)})
    if monitor is not None:
        lines.append({"step": stop_at or steps, "monitor": monitor})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 7, "loss": 1.2' if partial else ""))
    return load_run(run_dir, name, arm, seed)


def decay(step: float) -> float:
    """A smooth, decreasing loss curve: a power law, like a language model's."""
    return 1.0 + 4.0 * (1.0 + step / 50.0) ** -0.5


def test_load_run_skips_the_partial_line_and_eval_tokens_come_from_the_config(tmp_path):
    run = make_run(tmp_path, "a-s0", "a", 0, decay, steps=100, log_every=5, evals={50: 2.5, 100: 2.0})
    assert len(run.metrics) == 20 + 2  # 20 train records, 2 evals; the partial line is gone
    arm = analyse([run], "a", ema=0.0)["arms"]["a"]  # no smoothing: points sit at the logged tokens
    assert arm["curve"]["tokens"] == [s * BATCH * SEQ for s in range(5, 101, 5)]
    assert arm["val_points"] == {"tokens": [50 * 32, 100 * 32], "val_loss": [2.5, 2.0]}
    assert arm["token_budget"] == 100 * 32


def test_ema_is_bias_corrected(tmp_path):
    runs = [make_run(tmp_path, f"c-s{s}", "c", s, lambda step: 2.0) for s in (0, 1)]
    curve = analyse(runs, "c", ema=0.98)["arms"]["c"]["curve"]
    np.testing.assert_allclose(curve["mean"], 2.0, rtol=1e-12)  # from the first step, not from ~0
    np.testing.assert_allclose(curve["std"], 0.0, atol=1e-12)


def finals(tmp_path, arm, values, seeds):
    return [make_run(tmp_path, f"{arm}-s{s}", arm, s, decay, evals={200: v}) for s, v in zip(seeds, values)]


def test_mean_std_and_paired_standard_error(tmp_path):
    runs = finals(tmp_path, "base", [2.0, 2.2, 2.1], [0, 1, 2]) + finals(tmp_path, "hc", [1.9, 2.0, 2.05],
                                                                        [0, 1, 2])
    a = analyse(runs, "base")
    base, hc = a["arms"]["base"]["final"]["val_loss"], a["arms"]["hc"]["final"]["val_loss"]
    assert base["mean"] == pytest.approx(2.1) and base["std"] == pytest.approx(0.1)
    assert hc["mean"] == pytest.approx(1.983333, abs=1e-6) and hc["std"] == pytest.approx(0.076376, abs=1e-6)
    d = a["arms"]["hc"]["delta"]["val_loss"]
    # per-seed differences -0.1, -0.2, -0.05: mean -0.116667, std 0.076376, SE = std / sqrt(3)
    assert d["method"] == "paired" and d["dof"] == 2 and d["t"] == pytest.approx(4.303)
    assert d["diff"] == pytest.approx(-0.116667, abs=1e-6)
    assert d["se"] == pytest.approx(0.044096, abs=1e-6)
    assert d["ci95"] == pytest.approx([-0.116667 - 4.303 * 0.044096, -0.116667 + 4.303 * 0.044096], abs=1e-5)
    assert d["significant"] is False
    own = a["arms"]["base"]["delta"]["val_loss"]
    assert own["diff"] == 0.0 and own["se"] == 0.0
    assert a["arms"]["base"]["final"]["val_bpb"]["mean"] == pytest.approx(2.1 / math.log(2))


def test_welch_when_the_seed_sets_differ_and_one_seed_has_no_spread(tmp_path):
    runs = (finals(tmp_path, "base", [2.0, 2.2, 2.1], [0, 1, 2]) + finals(tmp_path, "hc", [1.9, 2.0], [0, 1])
            + finals(tmp_path, "one", [1.5], [0]))
    a = analyse(runs, "base")
    d = a["arms"]["hc"]["delta"]["val_loss"]
    # SE = sqrt(0.005 / 2 + 0.01 / 3); Welch-Satterthwaite dof 2.88 -> t(2)
    assert d["method"] == "welch" and d["diff"] == pytest.approx(-0.15)
    assert d["se"] == pytest.approx(math.sqrt(0.005 / 2 + 0.01 / 3))
    assert d["dof"] == pytest.approx(2.882, abs=1e-3) and d["t"] == pytest.approx(4.303)
    one = a["arms"]["one"]
    assert one["final"]["val_loss"] == {"n": 1, "mean": 1.5, "std": None,
                                        "per_seed": [{"seed": 0, "value": 1.5}]}
    assert one["delta"]["val_loss"]["se"] is None and one["delta"]["val_loss"]["ci95"] is None


def test_tokens_to_the_baselines_final_loss(tmp_path):
    steps = 1000
    runs = []
    for s in (0, 1):
        runs.append(make_run(tmp_path, f"base-s{s}", "base", s, lambda t: decay(t), steps=steps))
        runs.append(make_run(tmp_path, f"fast-s{s}", "fast", s, lambda t: decay(2 * t), steps=steps))
        runs.append(make_run(tmp_path, f"slow-s{s}", "slow", s, lambda t: decay(t) + 0.5, steps=steps))
    a = analyse(runs, "base")
    arms = a["arms"]
    assert a["target_loss"] == pytest.approx(arms["base"]["curve"]["mean"][-1])
    assert arms["base"]["ratio"]["reached"] and arms["base"]["ratio"]["ratio"] == pytest.approx(1.0)
    fast = arms["fast"]["ratio"]
    # loss_fast(t) = loss_base(2t): twice as fast; placing EMA points at their mean token removes
    # the EMA's lag (~49 records), which would otherwise read this as 2000 / (1000 + 49) ~ 1.9
    assert fast["reached"] and fast["ratio"] == pytest.approx(2.0, abs=0.02)
    assert a["baseline_tokens_to_target"] == pytest.approx((steps - 49) * BATCH * SEQ, rel=0.01)
    assert [p["ratio"] for p in fast["per_seed"]] == pytest.approx([fast["ratio"]] * 2)
    slow = arms["slow"]["ratio"]
    assert slow["reached"] is False and slow["ratio"] is None
    assert slow["ratio_upper_bound"] == pytest.approx(1.0)  # T_base = the whole budget here
    assert all(not p["reached"] for p in slow["per_seed"])
    # the difference curve is paired per seed and ends at the plain difference of the curves
    diff = arms["slow"]["diff_curve"]
    assert diff["paired"] and diff["mean"][-1] == pytest.approx(0.5)


def spiky(step: int) -> float:
    planted = {10: 1.0, 100: 1.0, 200: 1.0, 250: 1.0, 251: 1.0, 300: 1.0}  # 10 is in the warm-up
    return decay(step) + planted.get(step, 0.0)


def test_spikes_are_counted_once_per_excursion_and_smooth_curves_have_none(tmp_path):
    runs = [make_run(tmp_path, "base-s0", "base", 0, decay, steps=400),
            make_run(tmp_path, "base-s1", "base", 1, decay, steps=400),
            make_run(tmp_path, "spiky-s0", "spiky", 0, spiky, steps=400),
            make_run(tmp_path, "spiky-s1", "spiky", 1, decay, steps=400)]
    a = analyse(runs, "base")
    assert a["arms"]["base"]["spikes"]["total"] == 0
    spikes = a["arms"]["spiky"]["spikes"]
    assert spikes["total"] == 4
    assert [(p["seed"], p["count"]) for p in spikes["per_seed"]] == [(0, 4), (1, 0)]
    assert spikes["per_seed"][0]["steps"] == [100, 200, 250, 300]
    assert 0.8 < spikes["max_excursion"] < 1.0  # the +1 jump less the falling loss's EMA lag
    assert analyse(runs, "base", spike_threshold=2.0)["arms"]["spiky"]["spikes"]["total"] == 0


def test_unfinished_runs_are_excluded_and_listed(tmp_path):
    runs = [make_run(tmp_path, f"base-s{s}", "base", s, decay) for s in (0, 1)]
    runs += [make_run(tmp_path, "hc-s0", "hc", 0, decay, pathway="hc"),
             make_run(tmp_path, "hc-s1", "hc", 1, decay, stop_at=120, pathway="hc"),
             make_run(tmp_path, "dead-s0", "dead", 0, decay, stop_at=3, pathway="parallel")]
    a = write_report(runs, tmp_path / "report", baseline="base")
    assert [(u["name"], u["last_step"]) for u in a["unfinished"]] == [("hc-s1", 120), ("dead-s0", 3)]
    assert [r["val_loss"] for r in a["runs"]] == [2.0, 2.0, 2.0, None, None]
    assert a["arms"]["hc"]["n"] == 1 and a["arms"]["hc"]["seeds"] == [0]
    assert a["arms"]["hc"]["delta"]["val_loss"]["method"] == "welch"
    assert a["arms"]["dead"]["n"] == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 unfinished run(s) are left out" in md and "## Unfinished runs" in md
    assert "- hc-s1 (arm hc, seed 1): stopped at step 120 of 200" in md
    assert "| hc | 1 (+1 unfinished) |" in md


MONITOR = {"gain_row": [1.0, 2.5, 1.2], "gain_col": [1.0, 1.1, 3.0], "collapse_median": [0.5, 0.7],
           "collapse_p05": [0.3, 0.5], "collapse_p95": [0.6, 0.9]}


def test_report_files(tmp_path):
    runs = []
    for s in (0, 1, 2):
        runs.append(make_run(tmp_path, f"pre-s{s}", "prenorm", s, decay,
                             evals={100: 2.5, 200: 2.0 + s / 100}))
        # seed 2's monitor has a NaN (json writes it as NaN): report.json must carry null instead
        monitor = MONITOR if s < 2 else {**MONITOR, "collapse_p95": [0.6, float("nan")]}
        runs.append(make_run(tmp_path, f"dhc-s{s}", "dhc4,train.lr=1e-3", s, lambda t: decay(1.3 * t),
                             evals={100: 2.4, 200: 1.9 + s / 50}, monitor=monitor, pathway="hc",
                             expansion_rate=4))
    out = tmp_path / "report"
    a = write_report(runs, out, baseline="prenorm", command="hyperbit compare --arms prenorm dhc4")
    md = (out / "report.md").read_text()
    header = ("| arm | seeds | final val loss (mean ± std) | Δ vs baseline (± SE, paired/Welch, 95% CI) "
              "| val bits/byte | tokens to baseline's final loss (ratio) | loss spikes (total / per-seed) "
              "| tok/s |")
    assert header in md
    assert "| **prenorm** (baseline) | 3 |" in md and "| dhc4,train.lr=1e-3 | 3 |" in md
    assert "hyperbit compare --arms prenorm dhc4" in md and "## How to read this" in md
    assert "not significant" in md
    assert a["differing_keys"] == ["model.expansion_rate", "model.pathway"]  # train.seed is ignored
    assert "| model.expansion_rate | model.pathway |" in md
    for png in ("loss_vs_tokens.png", "final_val.png", "collapse.png"):
        assert f"]({png})" in md
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monitor = a["arms"]["dhc4,train.lr=1e-3"]["monitor"]
    assert monitor["median"] == pytest.approx([0.5, 0.7]) and monitor["max_gain"] == 3.0
    assert a["arms"]["prenorm"]["monitor"] is None

    def no_nan(token):
        raise AssertionError(f"{token} in report.json")

    saved = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert saved["arms"]["prenorm"]["final"]["val_loss"]["mean"] == pytest.approx(2.01)
    assert saved["arms"]["dhc4,train.lr=1e-3"]["monitor"]["p95"] == [pytest.approx(0.6), None]
    assert saved["arms"]["dhc4,train.lr=1e-3"]["ratio"]["ratio"] == pytest.approx(1.3, abs=0.05)
    assert sorted(p.name for p in out.iterdir()) == ["collapse.png", "final_val.png", "loss_vs_tokens.png",
                                                     "report.json", "report.md"]  # no temporary files


def test_unknown_baseline_is_a_clear_error(tmp_path):
    runs = [make_run(tmp_path, "a-s0", "a", 0, decay)]
    with pytest.raises(ValueError, match=r"baseline arm 'b' is not one of the arms \['a'\]"):
        analyse(runs, "b")


def test_postnorm_monitors_have_no_gain(tmp_path, monkeypatch):
    """Post-Norm logs null gains (no fixed connection weights); a record from before, which logged
    1s, counts as null too. Collapse is still averaged, and the plot's legend says why."""
    from hyperbit.reports.compare import figures

    null = {**MONITOR, "gain_row": None, "gain_col": None}
    old = {**MONITOR, "gain_row": [1.0] * 3, "gain_col": [1.0] * 3}
    runs = [make_run(tmp_path, "pre-s0", "prenorm", 0, decay, monitor=old),
            make_run(tmp_path, "post-s0", "postnorm", 0, decay, monitor=null, pathway="postnorm"),
            make_run(tmp_path, "post-s1", "postnorm", 1, decay, monitor=old, pathway="postnorm"),
            make_run(tmp_path, "dhc-s0", "dhc", 0, decay, monitor=MONITOR, pathway="hc")]
    figs = []
    monkeypatch.setattr(figures, "save", lambda fig, path: figs.append((path.name, fig)))
    a = write_report(runs, tmp_path / "report", baseline="prenorm")
    post = a["arms"]["postnorm"]["monitor"]
    assert post["max_gain"] is None and post["median"] == pytest.approx([0.5, 0.7])
    assert a["arms"]["prenorm"]["monitor"]["max_gain"] == 1.0  # Pre-Norm's gain is 1 by definition
    assert a["arms"]["dhc"]["monitor"]["max_gain"] == 3.0
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["arms"]["postnorm"]["monitor"]["max_gain"] is None
    legend = [t.get_text() for t in dict(figs)["collapse.png"].axes[0].get_legend().get_texts()]
    assert legend == ["prenorm, max gain 1.00", "postnorm, gain undefined", "dhc, max gain 3.00"]


def _figures(monkeypatch, runs, baseline, out) -> dict:
    """Write the report with ``save`` replaced: each figure laid out and drawn as it would be
    saved, then kept open to be measured."""
    from hyperbit.reports.compare import figures

    figs = {}

    def keep(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        figs[path.name] = fig

    monkeypatch.setattr(figures, "save", keep)
    write_report(runs, out, baseline=baseline)
    return figs


def test_final_val_title_fits_and_the_baselines_val_dots_are_on_top(tmp_path, monkeypatch):
    runs = []
    for s in (0, 1):  # two arms: the narrowest figure
        runs.append(make_run(tmp_path, f"pre-s{s}", "prenorm", s, decay,
                             evals={100: 2.5, 200: 2.0 + s / 100}))
        runs.append(make_run(tmp_path, f"dhc-s{s}", "dhc2", s, decay, evals={100: 2.5, 200: 2.0 + s / 100},
                             pathway="hc"))
    figs = _figures(monkeypatch, runs, "prenorm", tmp_path / "report")
    fig = figs["final_val.png"]
    ax = fig.axes[0]
    width, height = fig.canvas.get_width_height()
    box = ax.title.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= width and box.y1 <= height  # the whole title is in the figure
    assert ax.get_xlim() == (-0.5, 1.5)  # half a slot either side of the two arms
    # validation dots: both arms evaluate at the same tokens with the same losses here, so the
    # baseline's are hollow rings drawn above the other arm's dots
    left = figs["loss_vs_tokens.png"].axes[0]
    dots = {line.get_markeredgecolor(): line for line in left.get_lines() if line.get_marker() == "o"
            and line.get_linestyle() == "None"}
    base, other = dots["black"], dots["white"]
    assert list(base.get_xdata()) == list(other.get_xdata()) == [100 * 32, 200 * 32]
    assert base.get_zorder() > other.get_zorder() and base.get_markerfacecolor() == "none"
    assert base.get_markersize() > other.get_markersize()


def test_one_logged_point_and_one_depth_get_sensible_axes(tmp_path, monkeypatch):
    """A run of one step: one logged loss, one eval, one monitor; a one-block model: one depth pair."""
    monitor = {"gain_row": [1.0, 1.0], "gain_col": [1.0, 1.0], "collapse_median": [0.5],
               "collapse_p05": [0.3], "collapse_p95": [0.6]}
    runs = [make_run(tmp_path, f"{arm}-s{s}", arm, s, decay, steps=1, evals={1: 2.5 + s / 10},
                     monitor=monitor, partial=False, pathway=pathway)
            for s in (0, 1) for arm, pathway in (("prenorm", "prenorm"), ("dhc2", "hc"))]
    figs = _figures(monkeypatch, runs, "prenorm", tmp_path / "report")
    left, right = figs["loss_vs_tokens.png"].axes
    for ax in (left, right):  # 0 .. the one token count (32), not 30.4 .. 33.6 around it
        assert ax.get_xlim() == pytest.approx((0.0, 1.05 * 32))
        assert all(float(t).is_integer() for t in ax.get_xticks())
    # the one-point curves are drawn (a line through one point draws nothing): a marker each
    points = [line for line in left.get_lines()
              if list(line.get_xdata()) == [32] and line.get_marker() == "o"]
    assert len(points) == 2 + 2  # two arms' EMA loss and two arms' val loss
    assert right.get_ylim()[1] - right.get_ylim()[0] >= 0.01  # a flat difference: a readable axis
    assert figs["collapse.png"].axes[0].get_xlim() == (0.5, 1.5)
    assert figs["final_val.png"].axes[0].get_xlim() == (-0.5, 1.5)


def test_image_runs_report_test_accuracy(tmp_path):
    """Runs that log val_acc (the ViT) get accuracy in the table, with the paired difference to
    the baseline, in place of bits/byte."""
    def run(arm, seed, acc):
        r = make_run(tmp_path, f"{arm}-s{seed}", arm, seed, decay, evals={})
        with open(tmp_path / r.name / "metrics.jsonl", "w") as f:  # evals with accuracy, no bpb
            for step in range(1, 201):
                f.write(json.dumps({"step": step, "loss": decay(step), "tokens": step * BATCH * SEQ,
                                    "tok_s": 1000.0}) + "\n")
            f.write(json.dumps({"step": 200, "val_loss": 0.2, "val_acc": acc}) + "\n")
        return load_run(tmp_path / r.name, r.name, arm, seed)

    runs = [run("base", 0, 0.95), run("base", 1, 0.97), run("hc", 0, 0.96), run("hc", 1, 0.99)]
    a = write_report(runs, tmp_path / "report", baseline="base")
    assert a["arms"]["hc"]["final"]["val_acc"]["mean"] == pytest.approx(0.975)
    assert a["arms"]["hc"]["delta"]["val_acc"]["diff"] == pytest.approx(0.015)
    assert a["arms"]["hc"]["final"]["val_bpb"]["mean"] is None
    md = (tmp_path / "report" / "report.md").read_text()
    assert "test accuracy % (Δ vs baseline)" in md and "val bits/byte" not in md
    assert "| 97.5 ± 2.1 (+1.5 ± 0.5) |" in md  # per-seed differences +1.0, +2.0
    assert "| 96.0 ± 1.4 |" in md  # the baseline

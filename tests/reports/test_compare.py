"""`hyperbit compare`: the grid it plans, and a 2x2 tiny grid end to end, killed mid-run and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperbit.cli import main
from hyperbit.reports.compare import grid
from hyperbit.config import ConfigError

GRID = ["--preset", "tiny", "--arms", "prenorm,dhc2", "--seeds", "2", "train.steps=12",
        "train.save_every=4", "train.eval_every=6", "train.eval_batches=1", "train.monitor_every=6"]
RUNS = ["prenorm-s0", "dhc2-s0", "prenorm-s1", "dhc2-s1"]  # seed by seed


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_arms_seeds_and_axes():
    assert grid.arm_overrides("dhc4") == ["model.pathway=hc", "model.expansion_rate=4", "model.hc_dynamic=True"]
    assert grid.arm_overrides("shc2")[2] == "model.hc_dynamic=False"
    assert grid.arm_overrides("postnorm")[:2] == ["model.pathway=postnorm", "model.expansion_rate=1"]
    assert grid.parse_seeds("3") == [0, 1, 2] and grid.parse_seeds("0,5,7") == [0, 5, 7]
    assert grid.parse_seeds("2,") == [2]  # a single seed
    assert grid.parse_axis("train.lr=1e-3, 3e-3") == ("train.lr", ["1e-3", "3e-3"])
    for bad in (lambda: grid.arm_overrides("hc4"), lambda: grid.parse_seeds("1,1"),
                lambda: grid.parse_seeds("x"), lambda: grid.parse_seeds(","), lambda: grid.parse_axis("train.lr"),
                lambda: grid.parse_axis("model.pathway=hc,prenorm")):
        with pytest.raises(ConfigError):
            bad()


def test_plan_gives_every_run_the_same_token_budget():
    specs = grid.plan("tiny", [], ["prenorm", "dhc2"], [("train.batch_size", ["4", "8"])], [0, 1],
                      tokens=4096)
    assert [s.name for s in specs[:4]] == ["prenorm_train.batch_size=4-s0", "prenorm_train.batch_size=8-s0",
                                           "dhc2_train.batch_size=4-s0", "dhc2_train.batch_size=8-s0"]
    for s in specs:
        t = s.config.train
        assert t.steps * t.batch_size * t.seq_len == 4096 and t.log_every == 1
        assert t.seed == s.seed
    hc = specs[2].config.model
    assert (hc.pathway, hc.expansion_rate, hc.hc_dynamic) == ("hc", 2, True)
    with pytest.raises(ConfigError, match="conflicts with --arms"):
        grid.plan("tiny", ["model.pathway=hc"], ["prenorm"], [], [0])
    for own in ("train.seed=3", "train.log_every=10"):  # never silently replaced
        with pytest.raises(ConfigError, match="compare sets"):
            grid.plan("tiny", [own], ["prenorm"], [], [0])
    with pytest.raises(ConfigError, match="train.nope"):  # every run is validated before any trains
        grid.plan("tiny", [], ["prenorm"], [("train.nope", ["1"])], [0])


def test_grid_killed_mid_run_resumes_and_reports(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(["compare", *GRID, "--out", str(reference)]) == 0
    capsys.readouterr()

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hyperbit.cli", "compare", *GRID, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "runs" / RUNS[1] / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # the second run is between its first and last checkpoint
    proc.wait()
    assert latest.exists() and latest.read_text().strip() != "step_00000012", "killed too late"
    first = out / "runs" / RUNS[0] / "metrics.jsonl"
    finished_before = first.stat().st_mtime_ns

    assert main(["compare", *GRID, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "4 runs, 3 to train (1 finished or diverged, skipped)" in log
    assert "[1/3] dhc2-s0: resuming" in log
    assert first.stat().st_mtime_ns == finished_before  # the finished run was not touched
    for name in RUNS:  # resumed or not, every run has exactly the uninterrupted losses
        assert _losses(out / "runs" / name) == _losses(reference / "runs" / name), name

    assert main(["compare", *GRID, "--out", str(out)]) == 0
    assert "4 runs, 0 to train" in capsys.readouterr().out

    report = out / "report"
    text = (report / "report.md").read_text()
    assert "| arm | seeds | final val loss (mean ± std) |" in text
    assert "| **prenorm** (baseline) | 2 |" in text and "| dhc2 | 2 |" in text
    links = [part.split(")")[0] for part in text.split("](")[1:]]
    pngs = [link for link in links if link.endswith(".png")]
    assert {"loss_vs_tokens.png", "final_val.png"} <= set(pngs)
    for png in pngs:
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((report / "report.json").read_text())
    expected = json.loads((reference / "report" / "report.json").read_text())
    assert [(r["name"], r["finished"], r["val_loss"]) for r in summary["runs"]] == \
        [(r["name"], r["finished"], r["val_loss"]) for r in expected["runs"]]
    assert [r["name"] for r in summary["runs"]] == RUNS and summary["unfinished"] == []


def test_a_diverged_run_is_recorded_reported_and_not_retried(tmp_path, monkeypatch):
    from hyperbit.train import TrainingStopped

    real_train, calls = grid.train, []

    def train_or_diverge(cfg, out, resume=False):  # Post-Norm "diverges" at step 3
        calls.append(Path(out).name)
        if cfg.model.pathway != "postnorm":
            return real_train(cfg, out, resume=resume)
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text(cfg.to_json())
        raise TrainingStopped("non-finite loss (nan) or gradient norm at step 3")

    monkeypatch.setattr(grid, "train", train_or_diverge)
    args = ("tiny", ["train.steps=3", "train.eval_batches=1"], ["prenorm", "postnorm"], [], [0])
    report = grid.compare(*args, out=tmp_path)
    assert calls == ["prenorm-s0", "postnorm-s0"]
    assert grid.run_status(tmp_path / "runs" / "postnorm-s0", 3) == "diverged"
    assert grid.compare(*args, out=tmp_path) == report
    assert calls == ["prenorm-s0", "postnorm-s0"]  # deterministic: resuming would only diverge again
    text = report.read_text()
    assert "- postnorm-s0 (arm postnorm, seed 0): **diverged**: non-finite loss" in text
    assert "| postnorm | 0 (+1 unfinished) |" in text


def test_bad_input_is_one_line_and_touches_nothing(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["compare", "--preset", "tiny", "--out", str(foreign), "--seeds", "1"]) == 2
    assert "not a hyperbit compare directory" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    for argv in (["--arms", "prenorm,hc9x"], ["--baseline", "dhc8"], ["--seeds", "0"],
                 ["--axis", "train.lr"], ["model.pathway=hc"]):
        assert main(["compare", "--preset", "tiny", "--out", str(tmp_path / "new"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hyperbit: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


def test_axis_grid_reports_each_combination_against_its_own_baseline(tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--arms", "prenorm,dhc2", "--seeds", "1",
                 "--axis", "train.lr=1e-3,3e-3", "train.steps=6", "train.eval_batches=1"]) == 0
    capsys.readouterr()

    def val(name: str) -> float:
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in records if "val_loss" in r][-1]

    for lr in ("1e-3", "3e-3"):
        summary = json.loads((out / "report" / f"train.lr={lr}" / "report.json").read_text())
        assert summary["baseline"] == f"prenorm,train.lr={lr}"
        assert list(summary["arms"]) == [f"prenorm,train.lr={lr}", f"dhc2,train.lr={lr}"]
        delta = summary["arms"][f"dhc2,train.lr={lr}"]["delta"]["val_loss"]["diff"]
        assert delta == pytest.approx(val(f"dhc2_train.lr={lr}-s0") - val(f"prenorm_train.lr={lr}-s0"))
    overall = json.loads((out / "report" / "report.json").read_text())
    assert overall["baseline"] == "prenorm,train.lr=1e-3" and len(overall["arms"]) == 4


def test_report_only_with_no_runs_says_so_at_once(tmp_path, capsys, monkeypatch):
    """Nothing to report on: one line and exit 2 before any corpus is tokenised or file written."""
    prepared = []
    monkeypatch.setattr(grid, "prepare_data", lambda *args, **kwargs: prepared.append(args))
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        assert main(["compare", "--preset", "tiny", "--seeds", "1", "--out", str(out), "--report-only"]) == 2
        err = capsys.readouterr().err
        assert err == f"hyperbit: error: no runs in {out} to report on yet; run without --report-only\n"
    assert prepared == []
    assert not (tmp_path / "new").exists() and list(empty.iterdir()) == []


def test_a_budget_below_one_step_is_refused_with_the_minimum(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"token budget 1 \(--tokens\) is less than one training step of "
                                          r"prenorm \(4 x 32 = 128 tokens\); use --tokens 128 or more"):
        grid.plan("tiny", [], ["prenorm"], [], [0], tokens=1)
    # the minimum is the largest step of the grid: here the batch-8 runs' 256 tokens
    with pytest.raises(ConfigError,
                       match=r"prenorm,train.batch_size=8 \(8 x 32 = 256 tokens\); use --tokens 256"):
        grid.plan("tiny", [], ["prenorm", "dhc2"], [("train.batch_size", ["4", "8"])], [0], tokens=200)
    assert [s.config.train.steps for s in grid.plan("tiny", [], ["prenorm"], [], [0], tokens=128)] == [1]
    assert main(["compare", "--preset", "tiny", "--seeds", "1", "--out", str(tmp_path / "g"),
                 "--tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use --tokens 128 or more" in err
    assert not (tmp_path / "g").exists()


def test_a_budget_rounded_noticeably_is_noted_in_the_log(tmp_path):
    lines = []
    specs = grid.plan("tiny", [], ["prenorm", "dhc2"], [], [0, 1], tokens=1000, log=lines.append)
    assert [s.config.train.steps for s in specs] == [8] * 4  # 1000 / 128 = 7.8 steps
    assert lines == [f"note: {arm} trains 8 steps x 4 x 32 = 1,024 tokens, +2.4% off the budget of 1,000 "
                     "(whole steps only)" for arm in ("prenorm", "dhc2")]  # once per arm, not per seed
    lines.clear()  # 1030 -> 1,024 tokens (-0.6%) and an exact budget: nothing to say
    grid.plan("tiny", [], ["prenorm"], [], [0], tokens=1030, log=lines.append)
    grid.plan("tiny", [], ["prenorm"], [], [0], tokens=1024, log=lines.append)
    assert lines == []
    # only the runs that miss it: the batch-8 runs take 256 tokens a step, 1,152 = 4.5 of them
    grid.compare("tiny", [], ["prenorm"], [("train.batch_size", ["4", "8"])], [0], tokens=1152,
                 out=tmp_path / "g", dry_run=True, log=lines.append)
    assert lines[0] == ("note: prenorm,train.batch_size=8 trains 4 steps x 8 x 32 = 1,024 tokens, -11.1% off "
                        "the budget of 1,152 (whole steps only)")
    assert len(lines) == 1 + 2  # the note, then the dry run's two runs


def test_image_runs_are_not_tokenised(tmp_path):
    """A vision transformer's grid reads the digits as they are: no shared token shards."""
    from hyperbit.reports.compare.grid import RunSpec, prepare_shared_data
    from hyperbit.train.config import resolve_run_config

    cfg = resolve_run_config("vit-digits", [])
    prepare_shared_data([RunSpec("prenorm-s0", "prenorm", 0, cfg)], tmp_path, print)
    assert cfg.data.path == "digits" and not (tmp_path / "data").exists()

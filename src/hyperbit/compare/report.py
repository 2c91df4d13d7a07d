"""Analysis and report for ``hyperbit compare``: several arms (configurations) x seeds, one budget.

The question a comparison answers is "is arm A better than the baseline, by how much, and is that
more than seed noise?". Every number below is defined so that it can be checked by hand.

Inputs. Each run directory holds ``config.json`` (sections model/train/data) and ``metrics.jsonl``:
train records ``{"step", "loss", "tokens", "tok_s", ...}``, eval records ``{"step", "val_loss",
"val_bpb"}`` (their tokens are ``step * train.batch_size * train.seq_len``) and optional monitor
records ``{"step", "monitor": {...}}``. Unparsable lines (a run killed mid-write) are skipped; a
step logged twice keeps its last record.

Definitions (also printed under "How to read this" in report.md):

* Finished run: it has an eval record at ``train.steps``. Unfinished runs are counted, listed and
  left out of every aggregate, so a crashed seed cannot silently shift an arm's mean.
* EMA train loss: over the logged train records in order, ``m_t = beta m_{t-1} + (1 - beta) loss_t``
  with ``m_0 = 0``, reported as ``m_t / (1 - beta^t)`` (bias correction: without it the curve starts
  near 0 instead of at the loss). ``beta`` (default 0.98, ~50 records) is per logged record, so with
  ``train.log_every > 1`` the window spans proportionally more steps. Each smoothed point is placed
  at the same EMA of the token counts, i.e. at the mean token position of its weights, not at the
  last one: an EMA lags the raw loss by ~``beta / (1 - beta)`` records, and this placement removes
  that lag (exactly for a locally linear curve). Without it every token-to-target ratio is pulled
  towards 1: at beta 0.98, a power-law loss curve compressed 2x in tokens reads as 1.68x over 200
  logged steps (1.89x with the placement) and 1.89x over 1000 (1.98x). A curve therefore ends a
  little before the budget (about 49 records at beta 0.98).
* Arm curve: each finished seed's EMA curve linearly interpolated onto the arm's token grid (the
  union of its seeds' logged token counts, within the range all of them cover); the arm's mean,
  min-max band and sample std are taken over seeds at every grid point.
* Final validation loss / bits per byte of a run: its eval record at ``train.steps``. Per arm: mean
  and sample std (n - 1 in the denominator; ``None`` with one seed).
* Difference to the baseline: ``mean(arm) - mean(baseline)``. When both have the same set of
  finished seeds the runs are paired by seed (same seed = same initialisation seed and data order,
  so most run-to-run noise cancels): SE = std(per-seed differences) / sqrt(n), dof = n - 1.
  Otherwise Welch: SE = sqrt(s1^2/n1 + s2^2/n2) with Welch-Satterthwaite dof. The 95% interval is
  ``diff +- t * SE`` with the two-sided 97.5% t quantile (table for dof 1..30, rounded down for
  Welch; 1.96 beyond); "significant" means that interval excludes 0.
* Tokens-to-target ratio (the "converges 1.8x faster" measure): target = the baseline's seed-mean
  EMA loss at its last logged point. ``T(curve)`` = the first token count at which the curve is
  <= target (linear interpolation between logged points). ratio = T(baseline mean) / T(arm mean);
  > 1 means the arm gets there in fewer tokens; the baseline's own ratio is 1 by construction.
  An arm that never reaches the target gets ``reached = false`` and only an upper bound
  ``T(baseline) / (the arm's last token position)``. Per-seed values use each seed's own EMA curve
  against the same target and the same ``T(baseline mean)``. Token positions are the lag-free ones
  above, so the baseline's T is about its budget less the EMA's lag, and an arm whose loss curve is
  the baseline's compressed 2x in tokens gets a ratio of ~2.
* Loss spike: a logged step, after the first 5% of ``train.steps`` (warm-up), whose raw loss
  exceeds the bias-corrected EMA of the records before it by more than ``spike_threshold`` nats;
  consecutive spike records count as one spike. The excursion is that raw-minus-EMA gap; while the
  loss falls fast the EMA sits above it, so a jump then reads smaller than it is (conservative). The
  default threshold, 0.5 nats, is absolute (the same bar for every arm, so an arm cannot hide its
  spikes behind its own noise) and sits well above batch-to-batch noise: the demo configuration
  (16 x 128 byte tokens per step) has a per-step noise of ~0.1-0.15 nats and its largest excursion
  over 150 records is ~0.2. Per run the robust noise level (1.4826 x median absolute deviation of
  the excursions) is recorded too, to judge a smaller threshold for larger batches.
* Throughput: the median ``tok_s`` of a run's train records; per arm the median over its seeds.
  Informative only: it depends on what else the machine was doing.
* Monitor (when present): per arm, the seed mean of the last monitor record's collapse median and
  5%/95% band per depth, and the largest composite gain (rows and columns) over its seeds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..plots import pyplot, save

DEFAULT_EMA = 0.98
DEFAULT_SPIKE_THRESHOLD = 0.5  # nats; see the module docstring for why not 0.1
WARMUP_FRACTION = 0.05  # the first 5% of steps are ignored when counting spikes
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # dof 1..30
_MAIN_HEADER = ("| arm | seeds | final val loss (mean ± std) | Δ vs baseline (± SE, paired/Welch, 95% CI) "
                "| val bits/byte | tokens to baseline's final loss (ratio) "
                "| loss spikes (total / per-seed) | tok/s |")


@dataclass
class RunRecord:
    """One training run of the grid, as read back from its run directory."""

    name: str  # unique, e.g. "dhc4-s1"
    arm: str  # label shared by all seeds of one configuration
    seed: int
    config: dict  # the run's config.json
    metrics: list[dict]


def load_run(run_dir: str | Path, name: str, arm: str, seed: int) -> RunRecord:
    """Read ``config.json`` and ``metrics.jsonl`` of a run. A missing metrics file (a run that never
    started) gives no metrics, and unparsable lines are skipped, so a killed run reads as
    unfinished instead of failing the whole report."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"run {name}: cannot read {run_dir / 'config.json'}: {e}") from None
    metrics = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                metrics.append(record)
    return RunRecord(name=name, arm=arm, seed=int(seed), config=config, metrics=metrics)


@dataclass
class _Series:
    """A run's metrics as arrays, in step order."""

    steps_total: int  # train.steps
    tokens_per_step: int
    steps: np.ndarray  # logged train steps
    tokens: np.ndarray  # where each EMA point sits: the EMA of the logged token counts
    loss: np.ndarray
    ema: np.ndarray
    tok_s: np.ndarray
    evals: dict[int, dict]  # step -> eval record
    monitor: dict | None  # the last monitor record's payload
    last_step: int

    @property
    def finished(self) -> bool:
        return self.steps_total in self.evals and len(self.steps) > 0


def _parse(run: RunRecord, beta: float) -> _Series:
    train_cfg = run.config.get("train", {})
    try:
        steps_total = int(train_cfg["steps"])
        per_step = int(train_cfg["batch_size"]) * int(train_cfg["seq_len"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"run {run.name}: config.json lacks train.steps, train.batch_size or "
                         "train.seq_len") from None
    train, evals, monitor, last_step = {}, {}, None, 0
    for record in run.metrics:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        last_step = max(last_step, step)
        if isinstance(record.get("loss"), (int, float)) and math.isfinite(record["loss"]):
            train[step] = record
        if isinstance(record.get("val_loss"), (int, float)):
            evals[step] = record
        if isinstance(record.get("monitor"), dict):
            monitor = record["monitor"]
    order = sorted(train)
    loss = np.array([train[s]["loss"] for s in order], dtype=float)
    tokens = np.array([train[s].get("tokens", s * per_step) for s in order], dtype=float)
    return _Series(
        steps_total=steps_total, tokens_per_step=per_step, steps=np.array(order, dtype=float),
        tokens=_ema(tokens, beta), loss=loss, ema=_ema(loss, beta),
        tok_s=np.array([train[s]["tok_s"] for s in order if "tok_s" in train[s]], dtype=float),
        evals=evals, monitor=monitor, last_step=last_step)


def _ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (see the module docstring)."""
    out = np.empty(len(values))
    acc = 0.0
    for t, value in enumerate(values, start=1):
        acc = beta * acc + (1.0 - beta) * value
        out[t - 1] = acc / (1.0 - beta ** t)
    return out


def _spikes(s: _Series, beta: float, threshold: float) -> dict:
    """Spikes of one run: raw loss above the EMA of the preceding records by > threshold."""
    if len(s.loss) < 2:
        return {"count": 0, "steps": [], "max_excursion": None, "noise": None}
    excursion = s.loss[1:] - s.ema[:-1]  # record t against the EMA of records < t
    eligible = s.steps[1:] > WARMUP_FRACTION * s.steps_total
    flagged = eligible & (excursion > threshold)
    starts = flagged & ~np.concatenate([[False], flagged[:-1]])  # consecutive records: one spike
    seen = excursion[eligible]
    noise = 1.4826 * float(np.median(np.abs(seen - np.median(seen)))) if len(seen) else None
    return {"count": int(starts.sum()), "steps": [int(x) for x in s.steps[1:][starts]],
            "max_excursion": float(seen.max()) if len(seen) else None, "noise": noise}


def _first_reach(tokens: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """First token count at which ``curve`` is <= ``target``, interpolated linearly; None if never."""
    below = np.nonzero(curve <= target)[0]
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(tokens[0])
    x0, x1, y0, y1 = tokens[i - 1], tokens[i], curve[i - 1], curve[i]
    return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))


def _reach(tokens: np.ndarray, curve: np.ndarray, target: float, t_base: float) -> dict:
    t = _first_reach(tokens, curve, target)
    if t is None:
        return {"reached": False, "tokens": None, "ratio": None, "ratio_upper_bound": t_base / tokens[-1]}
    return {"reached": True, "tokens": t, "ratio": t_base / t, "ratio_upper_bound": None}


def _mean_std(values: list[float]) -> dict:
    a = np.array(values, dtype=float)
    return {"n": len(a), "mean": float(a.mean()) if len(a) else None,
            "std": float(a.std(ddof=1)) if len(a) > 1 else None}


def _t975(dof: float) -> float:
    """Two-sided 95% t quantile; dof rounded down (conservative for Welch's fractional dof)."""
    d = max(int(math.floor(dof)), 1)
    return _T975[d - 1] if d <= len(_T975) else 1.96


def _difference(arm: dict[int, float], base: dict[int, float]) -> dict | None:
    """arm mean - baseline mean with its standard error: paired by seed when the seed sets match
    (the shared data order and init seed cancel), otherwise Welch."""
    if not arm or not base:
        return None
    a, b = np.array(list(arm.values())), np.array(list(base.values()))
    diff = float(a.mean() - b.mean())
    if set(arm) == set(base):
        method = "paired"
        d = np.array([arm[s] - base[s] for s in sorted(arm)])
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
        dof = len(d) - 1
    else:
        method = "welch"
        se = dof = None
        if len(a) > 1 and len(b) > 1:
            va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
            se = float(math.sqrt(va + vb))
            denominator = va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)
            dof = float((va + vb) ** 2 / denominator) if denominator > 0 else len(a) + len(b) - 2
    t = _t975(dof) if se is not None else None
    ci = [diff - t * se, diff + t * se] if se is not None else None
    return {"diff": diff, "se": se, "method": method, "dof": dof, "t": t, "ci95": ci,
            "significant": (ci[0] > 0 or ci[1] < 0) if ci is not None else None}


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _arm_curves(series: list[_Series]) -> tuple[np.ndarray, np.ndarray]:
    """The arm's token grid and its seeds' EMA curves on it, shape (seeds, grid)."""
    lo = max(s.tokens[0] for s in series)
    hi = min(s.tokens[-1] for s in series)
    grid = np.unique(np.concatenate([s.tokens for s in series]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    return grid, np.stack([np.interp(grid, s.tokens, s.ema) for s in series])


def analyse(runs: list[RunRecord], baseline: str, *, ema: float = DEFAULT_EMA,
            spike_threshold: float = DEFAULT_SPIKE_THRESHOLD) -> dict:
    """Everything report.md and report.json show, as plain JSON-ready Python (``None`` for a
    number that does not exist, never NaN). See the module docstring for the definitions."""
    if not runs:
        raise ValueError("no runs to analyse")
    arms = list(dict.fromkeys(r.arm for r in runs))
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not one of the arms {arms}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if not spike_threshold > 0:
        raise ValueError(f"spike_threshold must be > 0, got {spike_threshold}")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    by_arm = {arm: [r for r in runs if r.arm == arm] for arm in arms}
    for arm, members in by_arm.items():
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"arm {arm!r} has a seed more than once: {seeds}")
    series = {r.name: _parse(r, ema) for r in runs}
    done = {arm: [r for r in members if series[r.name].finished] for arm, members in by_arm.items()}

    run_rows, unfinished = [], []
    for r in runs:
        s = series[r.name]
        # every row has every key (None where an unfinished run has no value): one schema to read
        row = {"name": r.name, "arm": r.arm, "seed": r.seed, "finished": s.finished,
               "last_step": s.last_step, "steps": s.steps_total, "val_loss": None, "val_bpb": None,
               "final_ema_loss": None, "tok_s": None, "spikes": None}
        if not s.finished:
            unfinished.append(row)
        else:
            final = s.evals[s.steps_total]
            row.update(val_loss=final["val_loss"], val_bpb=final.get("val_bpb"),
                       final_ema_loss=float(s.ema[-1]),
                       tok_s=float(np.median(s.tok_s)) if len(s.tok_s) else None,
                       spikes=_spikes(s, ema, spike_threshold))
        run_rows.append(row)
    rows = {row["name"]: row for row in run_rows}

    base_runs = done[baseline]
    base_curve = base_seed = None
    if base_runs:
        grid, curves = _arm_curves([series[r.name] for r in base_runs])
        base_curve = (grid, curves.mean(axis=0))
        base_seed = {r.seed: series[r.name] for r in base_runs}
    target = float(base_curve[1][-1]) if base_curve else None
    t_base = _first_reach(*base_curve, target) if base_curve else None

    # an arm's configuration is its first run's; the keys that differ between arms name the arms
    flat = {arm: _flatten(by_arm[arm][0].config) for arm in arms}
    keys = sorted(set().union(*flat.values()) - {"train.seed"})
    differing = [k for k in keys if len({json.dumps(flat[a].get(k)) for a in arms}) > 1]
    common = {k: flat[arms[0]][k] for k in keys if k not in differing}
    warnings = []
    for arm, members in by_arm.items():
        for r in members[1:]:
            other = _flatten(r.config)
            odd = sorted(k for k in set(other) | set(flat[arm])
                         if k != "train.seed" and other.get(k) != flat[arm].get(k))
            if odd:
                warnings.append(f"run {r.name} of arm {arm!r} differs from {members[0].name} in {odd}")

    arm_out = {}
    for arm in arms:
        members = done[arm]
        first = series[by_arm[arm][0].name]
        entry: dict = {"n": len(members), "seeds": [r.seed for r in members],
                       "unfinished": [r.name for r in by_arm[arm] if not series[r.name].finished],
                       "differs": {k: flat[arm].get(k) for k in differing},
                       "token_budget": first.steps_total * first.tokens_per_step}
        if members:
            entry.update(_arm_numbers(members, series, rows, done[baseline], base_curve, base_seed,
                                      target, t_base))
        arm_out[arm] = entry
    return _clean({
        "baseline": baseline,
        "settings": {"ema": ema, "spike_threshold": spike_threshold, "warmup_fraction": WARMUP_FRACTION},
        "seeds": sorted({r.seed for r in runs}),
        "common_config": common,
        "differing_keys": differing,
        "target_loss": target,
        "baseline_tokens_to_target": t_base,
        "arms": arm_out,
        "runs": run_rows,
        "unfinished": unfinished,
        "warnings": warnings,
    })


def _arm_numbers(members, series, rows, base_members, base_curve, base_seed, target, t_base) -> dict:
    """The per-arm block of the analysis for an arm with at least one finished run."""
    own = [series[r.name] for r in members]
    grid, curves = _arm_curves(own)
    mean = curves.mean(axis=0)
    out: dict = {"curve": {"tokens": grid, "mean": mean, "min": curves.min(axis=0),
                           "max": curves.max(axis=0),
                           "std": curves.std(axis=0, ddof=1) if len(own) > 1 else None}}
    eval_steps = sorted(set.intersection(*(set(s.evals) for s in own)))
    out["val_points"] = {"tokens": [st * own[0].tokens_per_step for st in eval_steps],
                         "val_loss": [float(np.mean([s.evals[st]["val_loss"] for s in own]))
                                      for st in eval_steps]}
    finals = {key: {r.seed: rows[r.name][key] for r in members if rows[r.name][key] is not None}
              for key in ("val_loss", "val_bpb")}
    base_finals = {key: {r.seed: rows[r.name][key] for r in base_members if rows[r.name][key] is not None}
                   for key in ("val_loss", "val_bpb")}
    out["final"] = {key: {**_mean_std(list(v.values())),
                          "per_seed": [{"seed": s, "value": x} for s, x in v.items()]}
                    for key, v in finals.items()}
    out["delta"] = {key: _difference(finals[key], base_finals[key]) for key in finals}
    out["ratio"] = out["diff_curve"] = None
    if base_curve is not None:
        out["ratio"] = {**_reach(grid, mean, target, t_base), "per_seed": [
            {"seed": r.seed, **_reach(s.tokens, s.ema, target, t_base)} for r, s in zip(members, own)]}
        out["diff_curve"] = _diff_curve(members, own, grid, base_curve, base_seed)
    spikes = [rows[r.name]["spikes"] for r in members]
    excursions = [sp["max_excursion"] for sp in spikes if sp["max_excursion"] is not None]
    out["spikes"] = {"total": sum(sp["count"] for sp in spikes),
                     "per_seed": [{"seed": r.seed, "count": sp["count"], "steps": sp["steps"]}
                                  for r, sp in zip(members, spikes)],
                     "max_excursion": max(excursions) if excursions else None}
    rates = [rows[r.name]["tok_s"] for r in members if rows[r.name]["tok_s"] is not None]
    out["tok_s"] = float(np.median(rates)) if rates else None
    out["monitor"] = _monitor(members, own)
    return out


def _diff_curve(members, own, grid, base_curve, base_seed) -> dict | None:
    """Arm EMA minus baseline EMA on the arm's grid (where the baseline covers it): per seed
    against the same seed of the baseline when the seed sets match, else against its mean."""
    base_grid, base_mean = base_curve
    keep = (grid >= base_grid[0]) & (grid <= base_grid[-1])
    if not keep.any():
        return None
    x = grid[keep]
    paired = set(base_seed) == {r.seed for r in members}

    def reference(seed: int) -> np.ndarray:
        if paired:
            return np.interp(x, base_seed[seed].tokens, base_seed[seed].ema)
        return np.interp(x, base_grid, base_mean)

    diffs = np.stack([np.interp(x, s.tokens, s.ema) - reference(r.seed) for r, s in zip(members, own)])
    return {"tokens": x, "mean": diffs.mean(axis=0), "lo": diffs.min(axis=0), "hi": diffs.max(axis=0),
            "paired": paired}


def _monitor(members: list[RunRecord], own: list[_Series]) -> dict | None:
    """Seed mean of the last monitor's collapse statistics per depth, and the largest gain."""
    found = [(r, s.monitor) for r, s in zip(members, own) if s.monitor and s.monitor.get("collapse_median")]
    if not found:
        return None
    depth = len(found[0][1]["collapse_median"])
    used = [(r, m) for r, m in found if all(len(m.get(k, ())) == depth
                                             for k in ("collapse_median", "collapse_p05", "collapse_p95"))]
    out = {key: np.mean([m[f"collapse_{key}"] for _, m in used], axis=0) if used else None
           for key in ("median", "p05", "p95")}
    gains = np.array([g for _, m in found for g in m.get("gain_row", []) + m.get("gain_col", [])],
                     dtype=float)
    gains = gains[np.isfinite(gains)]
    out["max_gain"] = float(gains.max()) if len(gains) else None
    out["seeds"] = [r.seed for r, _ in used]
    return out


def _clean(obj):
    """numpy -> Python, NaN/inf -> None, tuples -> lists: what json.dumps(allow_nan=False) takes."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ---------------------------------------------------------------------------------------------- #
# report


def write_report(runs: list[RunRecord], out_dir: str | Path, *, baseline: str, command: str | None = None,
                 title: str = "hyperbit compare", **analyse_kwargs) -> dict:
    """Analyse ``runs`` and write report.md, report.json and the plots into ``out_dir``; every file
    is written under a temporary name and moved into place, so an interrupted report never leaves
    a half-written one. Returns the analysis."""
    analysis = analyse(runs, baseline, **analyse_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if any(a["n"] for a in analysis["arms"].values()):
        _plot_loss(analysis, out / "loss_vs_tokens.png")
        _plot_final(analysis, out / "final_val.png")
        plots += [("EMA train loss and difference to the baseline vs tokens", "loss_vs_tokens.png"),
                  ("Final validation loss per arm", "final_val.png")]
    if any(a.get("monitor") for a in analysis["arms"].values()):
        _plot_collapse(analysis, out / "collapse.png")
        plots.append(("Representation collapse per depth at the last monitor", "collapse.png"))
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    _atomic_write(out / "report.md", _markdown(analysis, title, command, generated, plots))
    meta = {"title": title, "command": command, "generated": generated}
    # compact: the curves hold a number per logged step and arm
    _atomic_write(out / "report.json", json.dumps({**meta, **analysis}, allow_nan=False,
                                                  separators=(",", ":")) + "\n")
    return analysis


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tokens(n: float | None) -> str:
    if n is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _pm(stats: dict | None, digits: int = 4) -> str:
    if not stats or stats["mean"] is None:
        return "—"
    spread = f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else " (n=1)"
    return f"{stats['mean']:.{digits}f}{spread}"


def _delta_cell(d: dict | None) -> str:
    if d is None:
        return "—"
    text = f"{d['diff']:+.4f}"
    if d["se"] is None:
        return f"{text} (no SE: {d['method']} needs ≥ 2 seeds)"
    lo, hi = d["ci95"]
    mark = " *" if d["significant"] else ""
    return f"{text} ± {d['se']:.4f} ({d['method']}, 95% CI [{lo:+.4f}, {hi:+.4f}]){mark}"


def _ratio_cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["reached"]:
        return f"{r['ratio']:.2f}× ({_tokens(r['tokens'])} tok)"
    return f"< {r['ratio_upper_bound']:.2f}× (not reached)"


def _markdown(a: dict, title: str, command: str | None, generated: str,
              plots: list[tuple[str, str]]) -> str:
    arms, base = a["arms"], a["baseline"]
    lines = [f"# {title}", "", f"Generated {generated}.", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    common = a["common_config"]
    shape = ", ".join(f"{k.split('.', 1)[1]}={common[k]}" for k in
                      ("model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.ffn_hidden",
                       "train.seq_len") if k in common)
    budgets = {e["token_budget"] for e in arms.values()}
    lines += ["## Setup", "", f"- Shared model shape: {shape or '(none shared)'}"]
    factors = ("train.steps", "train.batch_size", "train.seq_len")
    if len(budgets) == 1:
        product = (f"{common['train.steps']} steps × {common['train.batch_size']} sequences × "
                   f"{common['train.seq_len']} tokens = " if all(k in common for k in factors) else "")
        lines.append(f"- Token budget per run: {product}{budgets.pop():,} tokens")
    else:
        lines.append("- Token budget per run differs by arm: " +
                     ", ".join(f"{arm} {e['token_budget']:,}" for arm, e in arms.items()))
    lines += [f"- Seeds: {', '.join(map(str, a['seeds']))}", f"- Baseline: `{base}`", ""]
    if a["differing_keys"]:
        keys = a["differing_keys"]
        lines += ["What differs between arms (train.seed aside):", "",
                  "| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {_cell(arm)} | " + " | ".join(_cell(json.dumps(e["differs"][k])) for k in keys) + " |"
                  for arm, e in arms.items()]
        lines.append("")
    lines += ["<details><summary>Shared configuration</summary>", "", "```"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in common.items()] + ["```", "", "</details>", ""]
    for w in a["warnings"]:
        lines.append(f"> Warning: {w}")
    lines += ["## Results", "", _MAIN_HEADER, "|---" * 8 + "|"]
    for arm, e in arms.items():
        name = f"**{_cell(arm)}** (baseline)" if arm == base else _cell(arm)
        seeds = f"{e['n']}" + (f" (+{len(e['unfinished'])} unfinished)" if e["unfinished"] else "")
        if not e["n"]:
            lines.append(f"| {name} | {seeds} |" + " — |" * 6)
            continue
        sp = e["spikes"]
        spikes = (f"{sp['total']} ({'/'.join(str(p['count']) for p in sp['per_seed'])})"
                  + (f", max {sp['max_excursion']:+.2f}" if sp["max_excursion"] is not None else ""))
        delta = "(baseline)" if arm == base else _delta_cell(e["delta"]["val_loss"])
        rate = f"{e['tok_s']:,.0f}" if e["tok_s"] is not None else "—"
        lines.append(f"| {name} | {seeds} | {_pm(e['final']['val_loss'])} | {delta} | "
                     f"{_pm(e['final']['val_bpb'])} | {_ratio_cell(e['ratio'])} | {spikes} | {rate} |")
    lines.append("")
    if a["unfinished"]:
        lines += [f"{len(a['unfinished'])} unfinished run(s) are left out of this table and of every "
                  "number and plot (listed at the end).", ""]
    if not arms[base]["n"]:
        lines += [f"The baseline `{base}` has no finished run, so there are no differences to it and no "
                  "token ratios.", ""]
    if not plots:
        lines += ["No run finished: no plots.", ""]
    if a["target_loss"] is not None:
        lines += [f"Target for the token ratio: the baseline's final EMA train loss {a['target_loss']:.4f}, "
                  f"reached at {_tokens(a['baseline_tokens_to_target'])} tokens.", ""]
    for caption, file in plots:
        lines += [f"![{caption}]({file})", ""]
    s = a["settings"]
    lines += [
        "## How to read this", "",
        f"- **EMA train loss**: the logged training loss smoothed as m_t = β m_(t-1) + (1-β) loss_t with "
        f"β = {s['ema']} per logged step, divided by 1-β^t (bias correction, so the curve starts at the "
        "loss, not at 0). Each point sits at the same average of the token counts (the centre of its "
        "window), which removes the EMA's lag; so curves end a little before the budget. Arm lines "
        "are the mean over seeds, bands the min-max over seeds.",
        "- **Final val loss / bits per byte**: the evaluation at the last step of each run; mean ± sample "
        "std (n-1) over seeds.",
        "- **Δ vs baseline**: arm mean − baseline mean (negative = lower loss than the baseline). *paired*: "
        "both have the same seeds, so each seed's difference is taken (same data order and init seed) "
        "and SE = std of those differences / √n; *Welch*: SE = √(s1²/n1 + s2²/n2). The 95% CI is "
        "Δ ± t·SE with the t quantile for the degrees of freedom. A Δ whose 95% interval contains 0 "
        "is **not significant**: it is within seed-to-seed noise. `*` marks intervals that exclude 0.",
        "- **Tokens to baseline's final loss (ratio)**: the target is the baseline's seed-mean EMA train "
        "loss at its last step; ratio = tokens the baseline needs to first reach it / tokens this arm "
        "needs (linear interpolation between logged points). > 1 means the arm gets there faster; "
        "\"< x (not reached)\" is an upper bound for an arm that never gets there. Per-seed values "
        "are in report.json.",
        f"- **Loss spikes**: logged steps after the first {s['warmup_fraction']:.0%} of training whose raw "
        f"loss exceeds the EMA of the steps before by more than {s['spike_threshold']} nats; consecutive "
        "spike steps count as one. Shown as total (per seed), max = the largest excursion seen (raw − "
        "EMA, nats; while the loss falls fast the EMA lags above it, so jumps then read smaller); "
        "report.json also has each run's noise level (1.4826 × MAD of the excursions).",
        "- **tok/s**: median throughput of the runs; informative only (it depends on the machine's load).",
        "- **Difference plot** (right panel): arm EMA − baseline EMA vs tokens, per seed when the seeds "
        "pair up (band: min-max over seeds), else each seed against the baseline's mean.",
    ]
    if any(e.get("monitor") for e in arms.values()):
        lines.append("- **Collapse**: median cosine between consecutive branch inputs per depth at the "
                     "last monitor (seed mean, band 5%-95%); closer to 1 = more collapsed.")
    lines.append("")
    if a["unfinished"]:
        lines += ["## Unfinished runs", ""]
        lines += [f"- {_cell(u['name'])} (arm {_cell(u['arm'])}, seed {u['seed']}): stopped at step "
                  f"{u['last_step']} of {u['steps']}" for u in a["unfinished"]]
        lines.append("")
    return "\n".join(lines)


def _colors(a: dict) -> dict[str, str]:
    """The baseline in black, the other arms in the tab10 cycle, in arm order."""
    palette = [f"C{i}" for i in range(10)]
    others = [arm for arm in a["arms"] if arm != a["baseline"]]
    return {a["baseline"]: "black", **{arm: palette[i % 10] for i, arm in enumerate(others)}}


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _plot_loss(a: dict, path: Path) -> None:
    plt = pyplot()
    colors = _colors(a)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    lows, highs = [], []
    for arm, e in a["arms"].items():
        if not e["n"]:
            continue
        c = e["curve"]
        x, mean, lo, hi = (_array(c[k]) for k in ("tokens", "mean", "min", "max"))
        width = 2.2 if arm == a["baseline"] else 1.5
        left.plot(x, mean, color=colors[arm], lw=width, label=f"{arm} (n={e['n']})")
        left.fill_between(x, lo, hi, color=colors[arm], alpha=0.18, lw=0)
        vx, vy = _array(e["val_points"]["tokens"]), _array(e["val_points"]["val_loss"])
        left.plot(vx, vy, "o", color=colors[arm], mec="white", ms=6, zorder=5)
        # clip the early-loss tail: the top is the band's value a tenth of the way into training
        t10 = x[0] + 0.1 * (x[-1] - x[0])
        late_val = [float(v) for v in vy[vx >= t10]]
        highs += [float(np.interp(t10, x, hi)), *late_val]
        lows += [float(np.nanmin(lo)), *late_val]
    bottom, top = float(np.nanmin(lows)), float(np.nanmax(highs))
    pad = 0.05 * max(top - bottom, 1e-6)
    left.set_ylim(bottom - pad, top + pad)
    left.set_xlabel("tokens")
    left.set_ylabel(f"train loss, EMA β={a['settings']['ema']} (val: dots)")
    left.set_title("loss vs tokens (seed mean, min-max band)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.axhline(0.0, color=colors[a["baseline"]], ls="--", lw=1, label=f"{a['baseline']} (baseline)")
    lows, highs = [0.0], [0.0]
    for arm, e in a["arms"].items():
        d = e.get("diff_curve")
        if arm == a["baseline"] or not d:
            continue
        x, mean, lo, hi = (_array(d[k]) for k in ("tokens", "mean", "lo", "hi"))
        right.plot(x, mean, color=colors[arm], lw=1.5,
                   label=f"{arm} ({'paired per seed' if d['paired'] else 'vs the baseline mean'})")
        right.fill_between(x, lo, hi, color=colors[arm], alpha=0.18, lw=0)
        late = x >= x[0] + 0.1 * (x[-1] - x[0])
        lows.append(float(np.nanmin(lo[late])))
        highs.append(float(np.nanmax(hi[late])))
    pad = 0.05 * max(max(highs) - min(lows), 1e-6)
    right.set_ylim(min(lows) - pad, max(highs) + pad)
    right.set_xlabel("tokens")
    right.set_ylabel("Δ EMA train loss vs baseline (< 0: better)")
    right.set_title("difference to the baseline (band: min-max over seeds)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    save(fig, path)


def _plot_final(a: dict, path: Path) -> None:
    plt = pyplot()
    colors = _colors(a)
    shown = [(arm, e) for arm, e in a["arms"].items()
             if e["n"] and e["final"]["val_loss"]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(shown) + 2), 4.5))
    for i, (arm, e) in enumerate(shown):
        stats = e["final"]["val_loss"]
        values = [p["value"] for p in stats["per_seed"]]
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        ax.plot(i + np.asarray(jitter), values, "o", color=colors[arm], alpha=0.6, ms=5)
        ax.errorbar(i + 0.25, stats["mean"], yerr=stats["std"] or 0.0, fmt="s", color=colors[arm],
                    capsize=5, ms=7, lw=2)
        if arm == a["baseline"]:
            ax.axhline(stats["mean"], color=colors[arm], ls=":", lw=1)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([f"{arm}\n(baseline)" if arm == a["baseline"] else arm for arm, _ in shown],
                       rotation=20 if len(shown) > 5 else 0)
    ax.set_ylabel("final val loss (nats/token)")
    ax.set_title("final validation loss: seeds (dots), mean ± std (square)")
    ax.grid(alpha=0.3, axis="y")
    save(fig, path)


def _plot_collapse(a: dict, path: Path) -> None:
    plt = pyplot()
    colors = _colors(a)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, e in a["arms"].items():
        m = e.get("monitor")
        if not m or m["median"] is None:
            continue
        median = _array(m["median"])
        depth = np.arange(1, len(median) + 1)
        gain = f", max gain {m['max_gain']:.2f}" if m["max_gain"] is not None else ""
        ax.plot(depth, median, "o-", color=colors[arm], label=f"{arm}{gain}")
        ax.fill_between(depth, _array(m["p05"]), _array(m["p95"]), color=colors[arm], alpha=0.15, lw=0)
        ax.set_xticks(depth)
    ax.set_xlabel("depth k (cosine of branch inputs k and k+1)")
    ax.set_ylabel("cosine similarity (median, 5-95% band)")
    ax.set_title("representation collapse at the last monitor (seed mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)


__all__ = ["DEFAULT_EMA", "DEFAULT_SPIKE_THRESHOLD", "RunRecord", "analyse", "load_run", "write_report"]

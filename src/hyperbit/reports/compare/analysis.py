"""Analysis for ``hyperbit compare``: several arms (configurations) x seeds, one budget.

The question a comparison answers is "is arm A better than the baseline, by how much, and is that
more than seed noise?". Every number below is defined so that it can be checked by hand.

Inputs. Each run directory holds ``config.json`` (sections model/train/data) and ``metrics.jsonl``:
train records ``{"step", "loss", "tokens", "tok_s", ...}``, eval records ``{"step", "val_loss",
"val_bpb"}`` (``"val_acc"`` instead of ``"val_bpb"`` for image classifiers; their tokens are
``step * train.batch_size * train.seq_len``) and optional monitor records ``{"step", "monitor":
{...}}``. Unparsable lines (a run killed mid-write) are skipped; a step logged twice keeps its last
record.

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
  5%/95% band per depth, and the largest composite gain (rows and columns) over its seeds; None
  for Post-Norm, which has no fixed connection weights and so no composite gain.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...runs import read_metrics
from ...train.config import RUN_CONFIG_FILE, flatten
from .stats import difference, ema, first_reach, mean_std, reach

STOPPED = "stopped.json"  # in a run dir: the run diverged, {"reason": ...}
DEFAULT_EMA = 0.98
DEFAULT_SPIKE_THRESHOLD = 0.5  # nats; see the module docstring for why not 0.1
WARMUP_FRACTION = 0.05  # the first 5% of steps are ignored when counting spikes


@dataclass
class RunRecord:
    """One training run of the grid, as read back from its run directory."""

    name: str  # unique, e.g. "dhc4-s1"
    arm: str  # label shared by all seeds of one configuration
    seed: int
    config: dict  # the run's config.json
    metrics: list[dict]
    stopped: str | None = None  # why training stopped early (non-finite loss), from stopped.json


def load_run(run_dir: str | Path, name: str, arm: str, seed: int) -> RunRecord:
    """Read ``config.json`` and ``metrics.jsonl`` of a run. A missing metrics file (a run that never
    started) gives no metrics, and unparsable lines are skipped, so a killed run reads as
    unfinished instead of failing the whole report."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"run {name}: cannot read {run_dir / RUN_CONFIG_FILE}: {e}") from None
    metrics = read_metrics(run_dir) or []
    stopped = None
    if (run_dir / STOPPED).exists():  # written by the grid when a run hits a non-finite loss
        try:
            stopped = str(json.loads((run_dir / STOPPED).read_text())["reason"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            stopped = "stopped (unreadable reason)"
    return RunRecord(name=name, arm=arm, seed=int(seed), config=config, metrics=metrics, stopped=stopped)


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
        tokens=ema(tokens, beta), loss=loss, ema=ema(loss, beta),
        tok_s=np.array([train[s]["tok_s"] for s in order if "tok_s" in train[s]], dtype=float),
        evals=evals, monitor=monitor, last_step=last_step)


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


def _arm_curves(series: list[_Series]) -> tuple[np.ndarray, np.ndarray]:
    """The arm's token grid and its seeds' EMA curves on it, shape (seeds, grid)."""
    lo = max(s.tokens[0] for s in series)
    hi = min(s.tokens[-1] for s in series)
    grid = np.unique(np.concatenate([s.tokens for s in series]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    return grid, np.stack([np.interp(grid, s.tokens, s.ema) for s in series])


#: the final evaluation's numbers an arm reports: loss, and bits/byte (language models) or test
#: accuracy (image classifiers), whichever the runs logged
FINAL_KEYS = ("val_loss", "val_bpb", "val_acc")


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
               "last_step": s.last_step, "steps": s.steps_total, **dict.fromkeys(FINAL_KEYS),
               "final_ema_loss": None, "tok_s": None, "spikes": None, "stopped": r.stopped}
        if not s.finished:
            unfinished.append(row)
        else:
            final = s.evals[s.steps_total]
            row.update({key: final.get(key) for key in FINAL_KEYS},
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
    t_base = first_reach(*base_curve, target) if base_curve else None

    # an arm's configuration is its first run's; the keys that differ between arms name the arms
    flat = {arm: flatten(by_arm[arm][0].config) for arm in arms}
    keys = sorted(set().union(*flat.values()) - {"train.seed"})
    differing = [k for k in keys if len({json.dumps(flat[a].get(k)) for a in arms}) > 1]
    common = {k: flat[arms[0]][k] for k in keys if k not in differing}
    warnings = []
    for arm, members in by_arm.items():
        for r in members[1:]:
            other = flatten(r.config)
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
              for key in FINAL_KEYS}
    base_finals = {key: {r.seed: rows[r.name][key] for r in base_members if rows[r.name][key] is not None}
                   for key in FINAL_KEYS}
    out["final"] = {key: {**mean_std(list(v.values())),
                          "per_seed": [{"seed": s, "value": x} for s, x in v.items()]}
                    for key, v in finals.items()}
    out["delta"] = {key: difference(finals[key], base_finals[key]) for key in finals}
    out["ratio"] = out["diff_curve"] = None
    if base_curve is not None:
        out["ratio"] = {**reach(grid, mean, target, t_base), "per_seed": [
            {"seed": r.seed, **reach(s.tokens, s.ema, target, t_base)} for r, s in zip(members, own)]}
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
    # Post-Norm has no composite gain: its monitors log null (records from before that logged 1s)
    gains = np.array([np.nan if g is None else g for r, m in found if not _postnorm(r)
                      for g in (m.get("gain_row") or []) + (m.get("gain_col") or [])], dtype=float)
    gains = gains[np.isfinite(gains)]
    out["max_gain"] = float(gains.max()) if len(gains) else None
    out["seeds"] = [r.seed for r, _ in used]
    return out


def _postnorm(run: RunRecord) -> bool:
    model = run.config.get("model")
    return isinstance(model, dict) and model.get("pathway") == "postnorm"


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


__all__ = ["DEFAULT_EMA", "DEFAULT_SPIKE_THRESHOLD", "RunRecord", "analyse", "load_run"]

"""The statistics of ``hyperbit compare``, as plain functions of arrays and dicts: the bias-corrected
EMA, the first token count a curve reaches a target, mean and sample std, and the difference of two
arms with its standard error (paired by seed, or Welch) and t-based 95% interval. The definitions
are written out in :mod:`hyperbit.reports.compare.analysis`."""

from __future__ import annotations

import math

import numpy as np

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # dof 1..30


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (see the module docstring)."""
    out = np.empty(len(values))
    acc = 0.0
    for t, value in enumerate(values, start=1):
        acc = beta * acc + (1.0 - beta) * value
        out[t - 1] = acc / (1.0 - beta ** t)
    return out


def first_reach(tokens: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """First token count at which ``curve`` is <= ``target``, interpolated linearly; None if never."""
    below = np.nonzero(curve <= target)[0]
    if len(below) == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(tokens[0])
    x0, x1, y0, y1 = tokens[i - 1], tokens[i], curve[i - 1], curve[i]
    return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))


def reach(tokens: np.ndarray, curve: np.ndarray, target: float, t_base: float) -> dict:
    t = first_reach(tokens, curve, target)
    if t is None:
        return {"reached": False, "tokens": None, "ratio": None, "ratio_upper_bound": t_base / tokens[-1]}
    return {"reached": True, "tokens": t, "ratio": t_base / t, "ratio_upper_bound": None}


def mean_std(values: list[float]) -> dict:
    a = np.array(values, dtype=float)
    return {"n": len(a), "mean": float(a.mean()) if len(a) else None,
            "std": float(a.std(ddof=1)) if len(a) > 1 else None}


def t975(dof: float) -> float:
    """Two-sided 95% t quantile; dof rounded down (conservative for Welch's fractional dof)."""
    d = max(int(math.floor(dof)), 1)
    return T975[d - 1] if d <= len(T975) else 1.96


def difference(arm: dict[int, float], base: dict[int, float]) -> dict | None:
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
    t = t975(dof) if se is not None else None
    ci = [diff - t * se, diff + t * se] if se is not None else None
    return {"diff": diff, "se": se, "method": method, "dof": dof, "t": t, "ci95": ci,
            "significant": (ci[0] > 0 or ci[1] < 0) if ci is not None else None}

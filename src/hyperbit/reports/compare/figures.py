"""The plots of a ``hyperbit compare`` report, drawn from the analysis dict alone:
``loss_vs_tokens.png``, ``final_val.png`` and ``collapse.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import position_axis, progress_axis, pyplot, save


#: the smallest loss range a y axis shows (nats): a flat or one-point curve gets a readable axis
MIN_LOSS_SPAN = 0.01


def _colors(a: dict) -> dict[str, str]:
    """The baseline in black, the other arms in the tab10 cycle, in arm order."""
    palette = [f"C{i}" for i in range(10)]
    others = [arm for arm in a["arms"] if arm != a["baseline"]]
    return {a["baseline"]: "black", **{arm: palette[i % 10] for i, arm in enumerate(others)}}


def _array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _curve(ax, x, mean, lo, hi, color, width, label, ring: bool = False) -> None:
    """A mean line with its band; a curve of one point (one logged step) as a marker with an
    error bar, since a line through one point draws nothing (``ring``: hollow, on top)."""
    if len(x) == 1:
        style = dict(mfc="none", mew=1.8, ms=10, zorder=4) if ring else dict(ms=5, zorder=3)
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", color=color, capsize=4,
                    label=label, **style)
        return
    ax.plot(x, mean, color=color, lw=width, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)


def plot_loss(a: dict, path: Path) -> None:
    plt = pyplot()
    colors = _colors(a)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    lows, highs, xs = [], [], []
    for arm, e in a["arms"].items():
        if not e["n"]:
            continue
        c = e["curve"]
        x, mean, lo, hi = (_array(c[k]) for k in ("tokens", "mean", "min", "max"))
        base = arm == a["baseline"]
        _curve(left, x, mean, lo, hi, colors[arm], 2.2 if base else 1.5, f"{arm} (n={e['n']})", base)
        vx, vy = _array(e["val_points"]["tokens"]), _array(e["val_points"]["val_loss"])
        # every arm evaluates at the same token counts: the baseline's dots are rings drawn on top,
        # so they stay visible over (and around) the other arms' dots
        style = (dict(mfc="none", mec=colors[arm], mew=1.8, ms=10, zorder=6) if base
                 else dict(color=colors[arm], mec="white", ms=6, zorder=5))
        left.plot(vx, vy, "o", ls="none", **style)
        # clip the early-loss tail: the top is the band's value a tenth of the way into training
        t10 = x[0] + 0.1 * (x[-1] - x[0])
        late_val = [float(v) for v in vy[vx >= t10]]
        highs += [float(np.interp(t10, x, hi)), *late_val]
        lows += [float(np.nanmin(lo)), *late_val]
        xs += [*x, *vx]
    bottom, top = float(np.nanmin(lows)), float(np.nanmax(highs))
    pad = max(0.05 * (top - bottom), MIN_LOSS_SPAN / 2)
    left.set_ylim(bottom - pad, top + pad)
    progress_axis(left, xs)
    left.set_xlabel("tokens")
    left.set_ylabel(f"train loss, EMA β={a['settings']['ema']} (val: dots, baseline's ringed)")
    left.set_title("loss vs tokens (seed mean, min-max band)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.axhline(0.0, color=colors[a["baseline"]], ls="--", lw=1, label=f"{a['baseline']} (baseline)")
    lows, highs, xs = [0.0], [0.0], []
    for arm, e in a["arms"].items():
        d = e.get("diff_curve")
        if arm == a["baseline"] or not d:
            continue
        x, mean, lo, hi = (_array(d[k]) for k in ("tokens", "mean", "lo", "hi"))
        _curve(right, x, mean, lo, hi, colors[arm], 1.5,
               f"{arm} ({'paired per seed' if d['paired'] else 'vs the baseline mean'})")
        late = x >= x[0] + 0.1 * (x[-1] - x[0])
        lows.append(float(np.nanmin(lo[late])))
        highs.append(float(np.nanmax(hi[late])))
        xs += list(x)
    pad = max(0.05 * (max(highs) - min(lows)), MIN_LOSS_SPAN / 2)
    right.set_ylim(min(lows) - pad, max(highs) + pad)
    progress_axis(right, xs or [e["curve"]["tokens"][-1] for e in a["arms"].values() if e["n"]])
    right.set_xlabel("tokens")
    right.set_ylabel("Δ EMA train loss vs baseline (< 0: better)")
    right.set_title("difference to the baseline (band: min-max over seeds)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    save(fig, path)


def plot_final(a: dict, path: Path) -> None:
    plt = pyplot()
    colors = _colors(a)
    shown = [(arm, e) for arm, e in a["arms"].items()
             if e["n"] and e["final"]["val_loss"]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(shown) + 2), 4.5))
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
    position_axis(ax, len(shown), first=0)
    ax.set_ylabel("final val loss (nats/token)")
    # two short lines: one long title overran a narrow figure (two arms) and was cut off
    ax.set_title("final validation loss\nseeds (dots), mean ± std (square)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    save(fig, path)


def plot_collapse(a: dict, path: Path) -> None:
    plt = pyplot()
    colors = _colors(a)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    depths = 0
    for arm, e in a["arms"].items():
        m = e.get("monitor")
        if not m or m["median"] is None:
            continue
        median = _array(m["median"])
        depth = np.arange(1, len(median) + 1)
        depths = max(depths, len(depth))
        # Post-Norm has no fixed connection weights, so no composite gain
        gain = f", max gain {m['max_gain']:.2f}" if m["max_gain"] is not None else ", gain undefined"
        ax.plot(depth, median, "o-", color=colors[arm], label=f"{arm}{gain}")
        ax.fill_between(depth, _array(m["p05"]), _array(m["p95"]), color=colors[arm], alpha=0.15, lw=0)
        if len(depth) == 1:  # a band of one depth draws nothing: show it as an error bar
            ax.errorbar(depth, median, yerr=[median - _array(m["p05"]), _array(m["p95"]) - median],
                        fmt="none", ecolor=colors[arm], capsize=5, alpha=0.6)
    ax.set_xticks(np.arange(1, depths + 1))
    position_axis(ax, depths)
    ax.set_xlabel("depth k (cosine of branch inputs k and k+1)")
    ax.set_ylabel("cosine similarity (median, 5-95% band)")
    ax.set_title("representation collapse at the last monitor (seed mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)

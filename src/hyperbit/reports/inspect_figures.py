"""The figures of ``hyperbit inspect``, drawn from its ``summary.json`` alone."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..analysis.inspect import WEIGHT_GROUPS
from .plots import position_axis, progress_axis

# --- figures --------------------------------------------------------------------------------------


def _plot_connections(plt, s: dict[str, Any], labels: list[str]) -> Any:
    m = s["config"]["model"]
    learned_title = f"learned ({m['pathway']}" + (f", n={m['expansion_rate']}" if m["pathway"] != "prenorm"
                                                  and m["pathway"] != "postnorm" else "")
    learned_title += ", token mean)" if s["connection_matrix"]["token_average"] else ")"
    refs = s["references"]
    scaled = s["connection_matrix"].get("C_times_rms")
    panels = [(learned_title, s["connection_matrix"]["C"]),
              ("learned x output RMS (what each input actually sums)", scaled),
              ("Pre-Norm", refs["prenorm"]["C"]), ("Post-Norm (idealised)", refs["postnorm"]["C"]),
              ("parallel n=2", refs["parallel_n2"]["C"])]
    K1 = len(labels)
    size = max(3.5, 0.32 * K1 + 1.5)
    fig, axes = plt.subplots(2, 3, figsize=(3 * size, 2 * size))
    axes.flat[-1].set_axis_off()
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.92")  # the undefined upper triangle
    rows = labels[1:] + ["out"]
    fig.suptitle("unfolded connection matrix C, each row divided by its largest |c| (every branch "
                 "and the output read through a norm,\nso only a row's relative weights matter; raw "
                 "values in summary.json)", fontsize=9)
    for ax, (title, C) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=9)
        if C is None:
            ax.text(0.5, 0.5, "not defined by fixed weights\n(Post-Norm renormalises)", ha="center",
                    va="center", transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
            continue
        arr = np.array([[to_float(v) for v in row] for row in C])
        arr = arr / np.maximum(np.nanmax(np.abs(np.tril(arr)), axis=1, keepdims=True), 1e-30)
        masked = np.ma.masked_where(np.triu(np.ones_like(arr, dtype=bool), 1), arr)
        im = ax.imshow(masked, cmap=cmap, vmin=-1.0, vmax=1.0)  # symmetric: 0 is white
        ax.set_xticks(range(K1), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(K1), rows, fontsize=7)
        ax.set_xlabel("output of", fontsize=8)
        ax.set_ylabel("input of", fontsize=8)
        if K1 <= 13:
            for i in range(K1):
                for j in range(i + 1):
                    ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=5.5)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def _plot_collapse(plt, s: dict[str, Any], labels: list[str]) -> Any:
    c = s["collapse"]
    x = np.arange(1, len(c["median"]) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(x) + 2), 3.6))
    ax.fill_between(x, _arr(c["p05"]), _arr(c["p95"]), alpha=0.3, label="5-95%")
    ax.plot(x, _arr(c["median"]), marker="o", label="median")
    if len(x) == 1:  # a band over one pair draws nothing: an error bar instead
        m = _arr(c["median"])
        ax.errorbar(x, m, yerr=[m - _arr(c["p05"]), _arr(c["p95"]) - m], fmt="none", capsize=5, alpha=0.5)
    ax.set_xticks(x, c["pairs"], rotation=60, fontsize=7)
    position_axis(ax, len(x))
    ax.set_xlabel("consecutive branches (k, k+1)")
    ax.set_ylabel("cos(x_k, x_k+1)")
    ax.set_title("representation collapse (1: consecutive branches read the same input)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _plot_gain(plt, s: dict[str, Any], labels: list[str]) -> Any:
    g = s["composite_gain"]
    x = np.arange(1, len(g["row"]) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(x) + 2), 3.6))
    ax.plot(x, _arr(g["row"]), marker="o", label="max abs row sum")
    ax.plot(x, _arr(g["col"]), marker="s", label="max abs column sum")
    _log_if_wide(ax, g["row"] + g["col"])
    _plain_y(ax)
    ax.set_xticks(x, labels[1:], fontsize=7)
    position_axis(ax, len(x))
    ax.set_xlabel("depth (branch)")
    ax.set_ylabel("composite gain of A_r^1 ... A_r^k")
    ax.set_title("composite gain (1 = no amplification by stream mixing)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _plot_grads(plt, s: dict[str, Any], labels: list[str]) -> Any:
    gn = s["grad_norm"]
    L = len(gn["attn"])
    x = np.arange(1, L + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * L + 2), 3.6))
    for i, key in enumerate(("attn", "ffn", "pathway")):
        ax.bar(x + (i - 1) * 0.27, _arr(gn[key]), width=0.27, label=key)
    _log_if_wide(ax, gn["attn"] + gn["ffn"] + gn["pathway"])
    ax.set_xticks(x, [str(i) for i in x])
    position_axis(ax, L)
    ax.set_xlabel("block")
    ax.set_ylabel("gradient L2 norm")
    head = "tied" if gn["head"] is None else fmt(gn["head"])
    ax.set_title(f"gradient norms (embedding {fmt(gn['embed'])}, head {head}, total {fmt(gn['total'])})",
                 fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _plot_dynamic(plt, s: dict[str, Any], labels: list[str]) -> Any:
    dyn = s["dynamic_weights"]
    titles = {"a_m_home": "A_m, home stream k mod n (branch input)", "a_m_other": "A_m, other streams",
              "beta": "B entries (branch output)", "a_r_diag": "A_r diagonal (stream keeps itself)",
              "a_r_offdiag": "A_r off-diagonal (mixing)"}
    K = len(labels) - 1
    x = np.arange(1, K + 1)
    fig, axes = plt.subplots(2, 3, figsize=(max(11.0, 0.7 * K + 6), 6.5), sharex=True)
    axes.flat[-1].set_axis_off()
    for ax, group in zip(axes.flat, WEIGHT_GROUPS):
        ax.set_title(titles[group], fontsize=9)
        q = dyn[group]
        if q is None:
            ax.text(0.5, 0.5, "none (n = 1)", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.fill_between(x, _arr(q["p05"]), _arr(q["p95"]), alpha=0.2, color="C0", label="5-95%")
        ax.fill_between(x, _arr(q["p25"]), _arr(q["p75"]), alpha=0.4, color="C0", label="25-75%")
        ax.plot(x, _arr(q["median"]), color="C0", marker="o", markersize=3, label="median")
        ax.set_xticks(x, labels[1:], fontsize=7)
        position_axis(ax, K)
    handles, names = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, names, loc="center")
    fig.suptitle("dynamic connection weights over the batch's tokens", fontsize=10)
    return fig


def _plot_monitors(plt, s: dict[str, Any], labels: list[str]) -> Any:
    mon = s["monitors"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.0))
    steps = mon["step"]
    gain = s["composite_gain"]
    if gain["row"] is None or all(v is None for v in mon["gain_row_last"] + mon["gain_col_last"]):
        left.text(0.5, 0.5, "not defined: no fixed connection weights\n(Post-Norm renormalises)",
                  ha="center", va="center", transform=left.transAxes, fontsize=9)
    else:
        for key, name, color in (("row", "row", "C0"), ("col", "column", "C1")):
            left.plot(steps, _arr(mon[f"gain_{key}_last"]), marker="o", ms=4, color=color,
                      label=f"max abs {name} sum (monitor)")
            # this report's own gain at the inspected step, on its batch: a hollow star around
            # the monitor's dot when both are logged at the same step
            left.plot([s["step"]], [to_float(gain[key][-1])], "*", mfc="none", mec=color, mew=1.2,
                      ms=14, zorder=3, label=f"{name} sum (this report)")
        _log_if_wide(left, mon["gain_row_last"] + mon["gain_col_last"] + gain["row"][-1:] + gain["col"][-1:])
        _plain_y(left)
        left.legend(fontsize=7)
    left.set_title("composite gain at the last depth", fontsize=9)
    right.plot(steps, _arr(mon["collapse_median_mean"]), marker="o", ms=4, color="C2")
    right.set_title("collapse: median cosine, mean over depth", fontsize=9)
    for ax in (left, right):
        ax.axvline(s["step"], color="0.5", linestyle="--", linewidth=1)  # the inspected checkpoint
        ax.set_xlabel("training step")
        progress_axis(ax, [*steps, s["step"]])
    mb, b = mon.get("batch"), s["batch"]
    if mb is not None:
        text = (f"training monitors: each on {mb['windows']} val windows x {mb['seq_len']} tokens; "
                f"this report (dashed line{', stars' if gain['row'] is not None else ''}): "
                f"{b['windows']} x {b['seq_len']} tokens")
        if s["dynamic_weights"] is not None:
            text += ("\ndynamic weights are averaged over a batch's tokens, so the two gains differ "
                     "with the batch")
        fig.suptitle(text, fontsize=9)
    return fig


#: file -> (draw(pyplot, summary, labels) -> figure, whether the summary has what it draws)
PLOTS = {
    "connection_matrix.png": (_plot_connections, lambda s: True),
    "collapse.png": (_plot_collapse, lambda s: True),
    "gain.png": (_plot_gain, lambda s: s["composite_gain"]["row"] is not None),
    "grad_norm.png": (_plot_grads, lambda s: True),
    "dynamic_weights.png": (_plot_dynamic, lambda s: s["dynamic_weights"] is not None),
    "monitors.png": (_plot_monitors, lambda s: s["monitors"] is not None),
}
PLOT_FILES = tuple(PLOTS)

def to_float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _arr(values: list[float | None]) -> np.ndarray:
    return np.array([to_float(v) for v in values], dtype=np.float64)


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _plain_y(ax) -> None:
    """Tick labels as the values themselves: a gain of 1 + 1e-6 reads 1.000001, not "+1" above the
    axis and 1e-6 steps on it."""
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)


def _log_if_wide(ax, values: list[float | None]) -> None:
    """Log y axis when the positive values span more than a factor of 10."""
    pos = [v for v in values if v is not None and v > 0]
    if pos and max(pos) > 10 * min(pos):
        ax.set_yscale("log")

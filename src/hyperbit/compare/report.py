"""The report directory of ``hyperbit compare``: report.md, report.json and the plots.

The numbers come from :func:`hyperbit.compare.analysis.analyse`, where every definition is
written out; report.md repeats them under "How to read this".
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from .._io import atomic_write_text
from ..plots import pyplot, save
from .analysis import DEFAULT_EMA, DEFAULT_SPIKE_THRESHOLD, RunRecord, analyse, load_run

_MAIN_HEADER = ("| arm | seeds | final val loss (mean ± std) | Δ vs baseline (± SE, paired/Welch, 95% CI) "
                "| val bits/byte | tokens to baseline's final loss (ratio) "
                "| loss spikes (total / per-seed) | tok/s |")


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
    atomic_write_text(out / "report.md", _markdown(analysis, title, command, generated, plots))
    meta = {"title": title, "command": command, "generated": generated}
    # compact: the curves hold a number per logged step and arm
    atomic_write_text(out / "report.json", json.dumps({**meta, **analysis}, allow_nan=False,
                                                  separators=(",", ":")) + "\n")
    return analysis


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
        "- **Δ vs baseline**: arm mean − baseline mean (negative = lower loss than the baseline). "
        "*paired*: "
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
        lines += [f"- {_cell(u['name'])} (arm {_cell(u['arm'])}, seed {u['seed']}): "
                  + (f"**diverged**: {_cell(u['stopped'])}" if u["stopped"] else
                     f"stopped at step {u['last_step']} of {u['steps']}") for u in a["unfinished"]]
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

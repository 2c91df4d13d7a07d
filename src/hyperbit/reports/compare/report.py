"""The report directory of ``hyperbit compare``: report.md, report.json and the plots.

The numbers come from :func:`hyperbit.reports.compare.analysis.analyse`, where every definition is
written out; report.md repeats them under "How to read this".
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..._io import atomic_write_text
from .analysis import DEFAULT_EMA, DEFAULT_SPIKE_THRESHOLD, RunRecord, analyse, load_run
from .figures import plot_collapse, plot_final, plot_loss

_MAIN_HEADER = ("| arm | seeds | final val loss (mean ± std) | Δ vs baseline (± SE, paired/Welch, 95% CI) "
                "| {second} | tokens to baseline's final loss (ratio) "
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
        plot_loss(analysis, out / "loss_vs_tokens.png")
        plot_final(analysis, out / "final_val.png")
        plots += [("EMA train loss and difference to the baseline vs tokens", "loss_vs_tokens.png"),
                  ("Final validation loss per arm", "final_val.png")]
    if any(a.get("monitor") for a in analysis["arms"].values()):
        plot_collapse(analysis, out / "collapse.png")
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


def _accuracy_cell(e: dict, baseline: bool) -> str:
    """Test accuracy in percent, mean ± std over seeds, and the difference to the baseline."""
    acc = e["final"]["val_acc"]
    if acc["mean"] is None:
        return "—"
    pct = {**acc, "mean": 100 * acc["mean"], "std": None if acc["std"] is None else 100 * acc["std"]}
    d = e["delta"]["val_acc"]
    if baseline or d is None:
        return _pm(pct, 1)
    se = f" ± {100 * d['se']:.1f}" if d["se"] is not None else ""
    return f"{_pm(pct, 1)} ({100 * d['diff']:+.1f}{se})"


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
    # language models report bits/byte; image classifiers (runs that logged val_acc) test accuracy
    accuracy = any(e["n"] and e["final"]["val_acc"]["mean"] is not None for e in arms.values())
    second = "test accuracy % (Δ vs baseline)" if accuracy else "val bits/byte"
    lines += ["## Results", "", _MAIN_HEADER.format(second=second), "|---" * 8 + "|"]
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
        second = _accuracy_cell(e, arm == base) if accuracy else _pm(e["final"]["val_bpb"])
        lines.append(f"| {name} | {seeds} | {_pm(e['final']['val_loss'])} | {delta} | "
                     f"{second} | {_ratio_cell(e['ratio'])} | {spikes} | {rate} |")
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
                     "last monitor (seed mean, band 5%-95%); closer to 1 = more collapsed. The legend's "
                     "max gain is the largest composite gain (row or column sums of the product of the "
                     "stream-mixing matrices) over depths and seeds; Post-Norm has none (no fixed "
                     "connection weights).")
    lines.append("")
    if a["unfinished"]:
        lines += ["## Unfinished runs", ""]
        lines += [f"- {_cell(u['name'])} (arm {_cell(u['arm'])}, seed {u['seed']}): "
                  + (f"**diverged**: {_cell(u['stopped'])}" if u["stopped"] else
                     f"stopped at step {u['last_step']} of {u['steps']}") for u in a["unfinished"]]
        lines.append("")
    return "\n".join(lines)


__all__ = ["DEFAULT_EMA", "DEFAULT_SPIKE_THRESHOLD", "RunRecord", "analyse", "load_run", "write_report"]

"""``hyperbit inspect CKPT``: what a checkpoint's residual pathway learned, as plots and JSON.

The numbers come from :func:`hyperbit.analysis.inspect.analyse` on one validation batch
(``batch_size`` windows of ``seq`` tokens from the val split); this module finds the checkpoint and
its data (:mod:`hyperbit.runs`), assembles ``summary.json`` with the references, labels and the
monitors logged during training, prints a short summary and draws the figures
(:mod:`hyperbit.reports.inspect_figures`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..analysis.inspect import (REFERENCE_DEFINITIONS, analyse, branch_labels, floats, num,
                                reference_matrices)
from ..analysis.monitor import MONITOR_WINDOWS
from ..config import ConfigError
from ..data import TokenShards
from ..data.digits import load_image_data
from ..runs import check_shards, load_trained, prepared_run_data, read_metrics
from .inspect_figures import PLOTS, fmt, to_float
from .plots import pyplot, save

SUMMARY_FILE = "summary.json"
MONITOR_NOTE = ("The training monitors were computed during training on their own batch (monitors.batch: "
                "the first validation windows of the run's data, under its train.precision), this "
                "report on its batch (batch, in fp32). Dynamic hyper-connections average their per-token "
                "weights over the batch's tokens, so their composite gain can differ between the two "
                "at the same step; fixed weights (static HC, Pre-Norm) do not depend on the batch.")
#: the output row's embedding coefficient counts as "near 0" below this fraction of the row's
#: largest absolute coefficient (the learned HC of the paper removes the embedding from the output)
NEAR_ZERO = 0.1


def read_monitors(run_dir: str | Path) -> dict[str, list] | None:
    """The training monitors a run logged to ``metrics.jsonl`` (``{"step": s, "monitor": {...}}``
    records), reduced to what is plotted: the deepest composite gains and the collapse median
    averaged over depth, per step (the last record of a step wins); null gains stay null. None
    when there are none. Unreadable lines (e.g. one being written right now) are skipped."""
    by_step: dict[int, tuple[float, float, float]] = {}
    for record in read_metrics(run_dir) or []:
        try:
            step, mon = record["step"], record["monitor"]
            median = [float(v) for v in mon["collapse_median"] if v is not None]
            # a null gain (Post-Norm: no fixed connection weights) stays null
            row, col = (None if mon[key] is None else mon[key][-1] for key in ("gain_row", "gain_col"))
            by_step[int(step)] = (to_float(row), to_float(col),
                                  sum(median) / len(median) if median else math.nan)
        except (ValueError, TypeError, KeyError, IndexError):
            continue
    if not by_step:
        return None
    steps = sorted(by_step)
    return {"step": steps, "gain_row_last": [num(by_step[s][0]) for s in steps],
            "gain_col_last": [num(by_step[s][1]) for s in steps],
            "collapse_median_mean": [num(by_step[s][2]) for s in steps]}

# --- the command --------------------------------------------------------------------------------


def inspect_checkpoint(checkpoint: str | Path, *, out: str | Path | None = None,
                       data: str | Path | None = None, batch_size: int = 8, seq: int | None = None,
                       device: str | None = None, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Inspect a checkpoint, write the report directory and return the summary (also written as
    ``summary.json``). ``out`` defaults to ``<run_dir>/inspect/step-<step>``; an existing
    directory is only written into when it is empty or an earlier report (holds summary.json),
    so a mistyped ``--out`` never overwrites someone's files."""
    model, cfg, tok, info = load_trained(checkpoint, device=device, tokenizer=tokenizer)
    seq = cfg.train.seq_len if seq is None else seq
    if not 1 <= seq <= cfg.model.max_seq_len:
        raise ConfigError(f"--seq must be in [1, {cfg.model.max_seq_len}] (the model's max_seq_len), "
                          f"got {seq}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out_dir = _report_dir(out, info)
    if cfg.model.arch == "vit":  # an image classifier: the first test images
        _, test = load_image_data(cfg.data.path if data is None else str(data))
        data_dir, split = cfg.data.path if data is None else str(data), "test"
        x, y = next(test.iter_eval_batches(batch_size, max_batches=1))
    else:
        data_dir, split = prepared_run_data(cfg, info, data), "val"
        shards = TokenShards(data_dir, "val")
        check_shards(shards, tok, cfg.model.vocab_size, str(data_dir), info["path"])
        x, y = next(shards.iter_eval_batches(batch_size, seq, max_batches=1))
        del shards
    dev = info["device"]
    result = analyse(model, x.to(dev), y.to(dev))

    K, run_dir = cfg.model.n_branches, info["run_dir"]
    labels = branch_labels(cfg.model.n_layers)
    learned = result["connection_matrix"]
    learned.update(rows=labels[1:] + ["out"], cols=labels)
    summary: dict[str, Any] = {
        "checkpoint": str(info["path"]), "step": info["step"],
        "run_dir": None if run_dir is None else str(run_dir), "device": str(dev),
        "config": {"model": cfg.model.to_dict(),
                   "train": {k: getattr(cfg.train, k) for k in ("steps", "batch_size", "seq_len", "lr")},
                   "data": {"path": cfg.data.path, "tokenizer": cfg.data.tokenizer}},
        "batch": {"data": str(data_dir), "split": split, "windows": int(x.shape[0]), "seq_len": seq,
                  "tokens": int(x.numel()) if cfg.model.arch == "lm" else int(x.shape[0]) * (seq or 0)},
        "loss": result["loss"],
        "output_rms": result["output_rms"],
        "connection_matrix": learned,
        "embedding_in_output": _embedding_in_output(learned["C"]),
        "references": {name: {"definition": REFERENCE_DEFINITIONS[name], "C": [floats(r) for r in m]}
                       for name, m in reference_matrices(K).items()},
        "collapse": {"pairs": [f"{a}-{b}" for a, b in zip(labels[1:], labels[2:])], **result["collapse"]},
        "composite_gain": result["composite_gain"],
        "grad_norm": result["grad_norm"],
        "dynamic_weights": result["dynamic_weights"],
        "monitors": None if run_dir is None else _monitors(read_monitors(run_dir), cfg, result),
    }
    summary["out_dir"] = str(out_dir)
    _write_report(out_dir, summary, labels)
    return summary


def _monitors(monitors: dict[str, list] | None, cfg, result: dict[str, Any]) -> dict[str, Any] | None:
    """The training monitors with the batch they were computed on and why their gain can differ
    from this report's: a different batch (and precision) averages dynamic weights differently."""
    if monitors is None:
        return None
    if result["composite_gain"]["row"] is None:  # Post-Norm (older runs logged a gain of 1 for it)
        monitors["gain_row_last"] = monitors["gain_col_last"] = [None] * len(monitors["step"])
    seq = cfg.train.seq_len
    monitors["batch"] = {"split": "val", "windows": MONITOR_WINDOWS, "seq_len": seq,
                         "tokens": MONITOR_WINDOWS * seq, "precision": cfg.train.precision}
    monitors["note"] = MONITOR_NOTE
    return monitors


def _report_dir(out: str | Path | None, info: dict[str, Any]) -> Path:
    if out is None:
        if info["run_dir"] is None:
            raise ConfigError(f"checkpoint {info['path']} is not inside a run directory; "
                              "pass --out DIR for the report")
        out_dir = Path(info["run_dir"]) / "inspect" / f"step-{info['step']}"
    else:
        out_dir = Path(out)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / SUMMARY_FILE).is_file():
            raise ConfigError(f"{out_dir} is not empty and holds no {SUMMARY_FILE} (not an inspect "
                              "report); refusing to write into it: pass another --out")
    return out_dir


def _write_report(out_dir: Path, summary: dict[str, Any], labels: list[str]) -> None:
    """Write summary.json first (it marks the directory as a report, so a run interrupted while
    plotting can simply be repeated), then the plots. Plots of an earlier report that this one
    does not draw are removed: every file named in the summary belongs to this inspection."""
    names = [name for name, (_, drawn) in PLOTS.items() if drawn(summary)]
    summary["files"] = [SUMMARY_FILE, *names]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    plt = pyplot()
    for name, (draw, _) in PLOTS.items():
        if name in names:
            save(draw(plt, summary, labels), out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)


def _embedding_in_output(C: list[list[float]] | None) -> dict[str, Any] | None:
    """How much of the embedding the output still reads, relative to the row's largest weight."""
    if C is None:
        return None
    row = [abs(v) for v in C[-1] if v is not None]
    weight, largest = C[-1][0], max(row, default=0.0)
    relative = abs(weight) / largest if weight is not None and largest > 0 else None
    return {"weight": weight, "relative_to_row_max": relative,
            "near_zero": relative is not None and relative < NEAR_ZERO, "threshold": NEAR_ZERO}


def human_summary(s: dict[str, Any]) -> str:
    m = s["config"]["model"]
    kind = m["pathway"] if m["pathway"] != "hc" else ("DHC" if m["hc_dynamic"] else "SHC")
    streams = (f", m={m['frac_rate']}" if m["pathway"] == "frac" else
               f", n={m['expansion_rate']}" if m["pathway"] not in ("prenorm", "postnorm") else "")
    c = s["collapse"]
    lines = [f"inspected step {s['step']} of {s['checkpoint']} ({kind}{streams}, {m['n_layers']} blocks) "
             f"on {s['batch']['tokens']:,} {s['batch']['split']} tokens: loss {fmt(s['loss'])}",
             f"  collapse at the last depth: median cos {fmt(c['median'][-1])} "
             f"(5-95%: {fmt(c['p05'][-1])} .. {fmt(c['p95'][-1])})"]
    g = s["composite_gain"]
    lines.append(f"  composite gain at the last depth: row {fmt(g['row'][-1])}, column {fmt(g['col'][-1])}"
                 f"; max over depths {fmt(g['max'])}" if g["row"] is not None
                 else f"  composite gain: not defined ({g['reason']})")
    if s["monitors"] is not None:
        lines.append(_monitor_line(s))
    e = s["embedding_in_output"]
    if e is not None:
        verdict = "near 0: the output has dropped the embedding" if e["near_zero"] else "not near 0"
        lines.append(f"  embedding weight in the output row: {fmt(e['weight'])} "
                     f"({fmt(e['relative_to_row_max'])} x the row's largest |c|; {verdict})")
    gn = s["grad_norm"]
    lines.append(f"  grad norm: total {fmt(gn['total'])}, embedding {fmt(gn['embed'])}, "
                 f"head {'tied' if gn['head'] is None else fmt(gn['head'])}")
    lines.append(f"  wrote {len(s['files'])} files to {s['out_dir']}: {', '.join(s['files'])}")
    return "\n".join(lines)


def _monitor_line(s: dict[str, Any]) -> str:
    """The training monitor's gain at the inspected step (when it logged one) and its batch beside
    this report's, so a different number does not go unexplained."""
    mon, mb, b = s["monitors"], s["monitors"]["batch"], s["batch"]
    batches = (f"{mb['windows']} val windows x {mb['seq_len']} tokens, this report "
               f"{b['windows']} x {b['seq_len']}")
    records = f"{len(mon['step'])} record{'' if len(mon['step']) == 1 else 's'}"
    if s["composite_gain"]["row"] is None:
        return f"  training monitors: {records}, each on {batches}; no gain (as above)"
    why = ("dynamic weights are averaged over each batch's tokens, so the gains can differ"
           if s["dynamic_weights"] is not None else "fixed weights: the batch does not change the gain")
    if s["step"] in mon["step"]:
        i = mon["step"].index(s["step"])
        return (f"  training monitor at step {s['step']}: gain row {fmt(mon['gain_row_last'][i])}, column "
                f"{fmt(mon['gain_col_last'][i])} on its own batch ({batches}; {why})")
    return f"  training monitors: {records}, each on {batches} ({why})"

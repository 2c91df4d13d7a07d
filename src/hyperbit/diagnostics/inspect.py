"""``hyperbit inspect CKPT``: what a checkpoint's residual pathway learned, as plots and JSON.

On one validation batch (``batch_size`` windows of ``seq`` tokens from the val split) the
report computes, in fp32 with the model in eval mode:

- the unfolded connection matrix ``C`` (spec section 5; dynamic HC: the token-averaged weights)
  beside three references of the same size: Pre-Norm, an idealised Post-Norm and the parallel
  n = 2 preset (:func:`reference_matrices`). The learned matrix is only comparable to them
  because all four are unfolded the same way. ``C`` weighs outputs of very different sizes (the
  embedding is usually far smaller than a branch output), so the report also gives each output's
  RMS and ``C`` times it, column by column: what each branch input is actually made of;
- representation collapse (spec section 6): cosine of consecutive branch inputs per depth;
- composite gain: largest absolute row / column sum of the product of stream-mixing matrices;
- the gradient norm of every block's attention, FFN and pathway parameters, plus embedding and
  head, from one forward + backward on the batch (no optimizer step; gradients are cleared);
- dynamic HC only: quantiles over tokens of the per-token connection weights, which the token
  average in ``C`` hides.

Everything goes into ``summary.json`` and a handful of PNGs in the report directory. The model
runs twice on the batch: one forward records every pathway's state and connection weights (the
same capture as the training monitors, ``pathway_states``), from which ``C``, the gain, collapse
and the dynamic-weight quantiles all follow; one forward + backward gives the gradients and the
output sizes. A tiny checkpoint takes well under a second of compute; drawing the plots takes
longer.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write_text
from ..config import ConfigError
from ..data import DataError, TokenShards
from ..pathways import HyperConnection, parallel_matrix
from ..plots import pyplot, save
from .collapse import consecutive_cosine, inputs_from_states
from .connections import (BranchWeights, PathwayState, branch_weights_from_states, composite_gain,
                          from_matrix, pathway_states, unfold)

SUMMARY_FILE = "summary.json"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_KEYS = ("p05", "p25", "median", "p75", "p95")
WEIGHT_GROUPS = ("a_m_home", "a_m_other", "beta", "a_r_diag", "a_r_offdiag")
#: the output row's embedding coefficient counts as "near 0" below this fraction of the row's
#: largest absolute coefficient (the learned HC of the paper removes the embedding from the output)
NEAR_ZERO = 0.1

REFERENCE_DEFINITIONS = {
    "prenorm": "Pre-Norm h <- h + T(norm(h)): the n = 1 identity connection, unfolded; every branch "
               "and the output read the embedding and every earlier branch output with weight 1.",
    "postnorm": "Post-Norm h <- norm(h + T(h)), idealised as s_k = (s_{k-1} + T_k) / sqrt(2): the "
                "norm of a sum of two equal-norm uncorrelated vectors. Row k (k <= K: branch k's input "
                "s_{k-1}; k = K+1: the output s_K) has c_k0 = 2^{-(k-1)/2} and c_kj = 2^{-(k-j)/2} "
                "for 1 <= j < k. The real Post-Norm rescales by data-dependent norms, so its C is "
                "not defined by fixed weights.",
    "parallel_n2": "The n = 2 parallel preset (spec section 4): unfold of "
                   "parallel_matrix(2, k) for every branch k = 0 .. K-1; branches run in pairs.",
}


# --- references and labels ----------------------------------------------------------------------


def reference_matrices(K: int) -> dict[str, Tensor]:
    """Unfolded ``(K+1, K+1)`` connection matrices of three reference pathways with ``K`` branches
    (layout of :func:`~hyperbit.diagnostics.connections.unfold`: row ``k-1`` is branch ``k``'s
    input, the last row the output; column 0 the embedding). See :data:`REFERENCE_DEFINITIONS`.

    Post-Norm has no fixed connection weights: each block renormalises ``h + T(h)``. If the two
    summands have equal norm and are uncorrelated, their sum has sqrt(2) times that norm, so the
    norm divides by sqrt(2) and every earlier contribution decays by sqrt(2) per branch. That is
    the idealisation drawn here, a picture of the geometric decay rather than of a real model.
    """
    if K < 1:
        raise ValueError(f"need at least one branch, got K={K}")
    one = torch.ones(1)
    prenorm = unfold([BranchWeights(one, one, one.view(1, 1)) for _ in range(K)])
    postnorm = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    for k in range(1, K + 2):  # k = K + 1 is the output row
        postnorm[k - 1, 0] = 2.0 ** (-(k - 1) / 2)
        for j in range(1, k):
            postnorm[k - 1, j] = 2.0 ** (-(k - j) / 2)
    parallel = unfold([from_matrix(parallel_matrix(2, k)) for k in range(K)])
    return {"prenorm": prenorm, "postnorm": postnorm, "parallel_n2": parallel}


def branch_labels(n_layers: int) -> list[str]:
    """``["emb", "a1", "f1", ..., "aL", "fL"]``: the columns of ``C``; its rows are ``[1:]`` plus
    ``"out"``."""
    return ["emb"] + [f"{kind}{i}" for i in range(1, n_layers + 1) for kind in ("a", "f")]


# --- what is computed ---------------------------------------------------------------------------


@contextmanager
def _output_rms(model: nn.Module) -> Iterator[list[Tensor]]:
    """The RMS over features of every output the residual pathway carries (embedding, then each
    branch in execution order), averaged over the tokens: C's coefficients multiply outputs of
    very different sizes (the embedding is typically far smaller than a branch output)."""
    rms: list[Tensor] = []

    def record(mod, args, output):
        rms.append(output.detach().float().pow(2).mean(-1).sqrt().mean().cpu())

    modules = [model.embed] + [m for block in model.blocks for m in (block.attn, block.ffn)]
    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        yield rms
    finally:
        for h in hooks:
            h.remove()


def _grad_norm(params: list[nn.Parameter]) -> float:
    unique = {id(p): p for p in params if p.grad is not None}
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in unique.values()))


def gradient_norms(model: nn.Module) -> dict[str, Any]:
    """L2 norms of the gradients currently held by ``model`` (after one backward): per block the
    attention, FFN and pathway parameters (the pathway owns the branch norms and, for HC, the
    connection weights), plus embedding, head (None when tied to the embedding), final norm and
    the whole model. Where the gradient vanishes or explodes with depth shows here first."""
    blocks = model.blocks
    tied = model.head.weight is model.embed.weight
    return {
        "attn": [_grad_norm(list(b.attn.parameters())) for b in blocks],
        "ffn": [_grad_norm(list(b.ffn.parameters())) for b in blocks],
        "pathway": [_grad_norm([*b.attn_path.parameters(), *b.ffn_path.parameters()]) for b in blocks],
        "embed": _grad_norm([model.embed.weight]),
        "head": None if tied else _grad_norm([model.head.weight]),
        "final_norm": _grad_norm(list(model.final_norm.parameters())),
        "total": _grad_norm(list(model.parameters())),
        "note": "pathway = both pathways of the block: branch norms and connection weights"
                + ("; head tied to the embedding" if tied else ""),
    }


@torch.no_grad()
def dynamic_weight_quantiles(states: list[PathwayState]) -> dict[str, Any]:
    """Per branch, quantiles over tokens (and entries) of the per-token DHC weights the pathways
    computed in a forward pass (:func:`~hyperbit.diagnostics.connections.pathway_states`). The token average in ``C`` can hide weights that swing
    widely from token to token; these bands show it.

    Groups: ``beta`` (B entries), ``a_r_diag`` / ``a_r_offdiag`` (A_r), and A_m split the same
    way into ``a_m_home`` (entry ``k mod n``, the stream branch ``k`` reads at init) and
    ``a_m_other``: pooled, the 1s and 0s of A_m's init would make one band from 0 to 1 that says
    nothing about the tokens. The ``other`` groups are None for n = 1."""
    per_group: dict[str, list[np.ndarray]] = {g: [] for g in WEIGHT_GROUPS}
    for st in states:
        p, n = st.pathway, st.pathway.expansion_rate
        alpha, beta = st.alpha, st.beta  # (B, T, n, n+1), (B, T, n)
        alpha = alpha.reshape(-1, n, n + 1).double().cpu()
        a_m, a_r = alpha[:, :, 0], alpha[:, :, 1:]
        home = torch.arange(n) == p.branch_index % n
        off = ~torch.eye(n, dtype=torch.bool)
        values = {"a_m_home": a_m[:, home], "a_m_other": a_m[:, ~home],
                  "beta": beta.reshape(-1, n).double().cpu(),
                  "a_r_diag": a_r.diagonal(dim1=-2, dim2=-1), "a_r_offdiag": a_r[:, off]}
        for g, v in values.items():
            if v.numel():
                per_group[g].append(np.quantile(v.flatten().numpy(), QUANTILES))
    out: dict[str, Any] = {"quantiles": list(QUANTILES)}
    for g, rows in per_group.items():
        q = np.stack(rows, axis=1) if rows else None  # (5, K)
        out[g] = None if q is None else {key: _floats(q[i]) for i, key in enumerate(QUANTILE_KEYS)}
    return out


def analyse(model: nn.Module, idx: Tensor, targets: Tensor) -> dict[str, Any]:
    """Every number of the report for ``model`` on one batch (``idx``, next-token ``targets``).

    Post-Norm gets no learned ``C`` and no composite gain: its connections are renormalisations
    that depend on the data, not weights (``model_branch_weights`` would report the Pre-Norm
    pattern for it, which is wrong). The model is left in eval mode with no gradients (any it
    held are discarded)."""
    model.eval()
    cfg = model.cfg
    pathways = model.pathways()
    dynamic = any(isinstance(p, HyperConnection) and p.dynamic for p in pathways)
    postnorm = cfg.pathway == "postnorm"
    out: dict[str, Any] = {}
    states = pathway_states(model, idx)  # one forward: the connection weights and branch inputs
    if postnorm:
        reason = "Post-Norm renormalises h + T(h) after every branch: no fixed connection weights"
        out["connection_matrix"] = {"C": None, "reason": reason, "token_average": False}
        out["composite_gain"] = {"row": None, "col": None, "max": None, "reason": reason}
    else:
        branches = branch_weights_from_states(states)
        C = unfold(branches)
        out["connection_matrix"] = {"C": [_floats(r) for r in C], "reason": None, "token_average": dynamic}
        rows, cols = composite_gain(branches)
        out["composite_gain"] = {"row": _floats(rows), "col": _floats(cols),
                                 "max": _num(max(rows.max(), cols.max())), "reason": None}
    c = consecutive_cosine(inputs_from_states(states))
    out["collapse"] = {key: _floats(c[key]) for key in ("median", "p05", "p95")}
    with _output_rms(model) as rms, torch.enable_grad():
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
    out["loss"] = _num(loss.detach())
    out["output_rms"] = _floats(torch.stack(rms))
    if not postnorm:  # what row k actually sums: coefficient x the size of what it weights
        out["connection_matrix"]["C_times_rms"] = [_floats(r) for r in C.cpu() * torch.stack(rms).double()]
    out["grad_norm"] = gradient_norms(model)
    model.zero_grad(set_to_none=True)
    out["dynamic_weights"] = dynamic_weight_quantiles(states) if dynamic else None
    return out


def read_monitors(metrics: Path) -> dict[str, list] | None:
    """The training monitors logged to ``metrics.jsonl`` (``{"step": s, "monitor": {...}}``
    records), reduced to what is plotted: the deepest composite gains and the collapse median
    averaged over depth, per step (the last record of a step wins). None when there are none.
    Unreadable lines (e.g. one being written right now) are skipped."""
    by_step: dict[int, tuple[float, float, float]] = {}
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        try:
            record = json.loads(line)
            step, mon = record["step"], record["monitor"]
            median = [float(v) for v in mon["collapse_median"] if v is not None]
            by_step[int(step)] = (_nan(mon["gain_row"][-1]), _nan(mon["gain_col"][-1]),
                                  sum(median) / len(median) if median else math.nan)
        except (ValueError, TypeError, KeyError, IndexError):
            continue
    if not by_step:
        return None
    steps = sorted(by_step)
    return {"step": steps, "gain_row_last": [_num(by_step[s][0]) for s in steps],
            "gain_col_last": [_num(by_step[s][1]) for s in steps],
            "collapse_median_mean": [_num(by_step[s][2]) for s in steps]}


# --- the command --------------------------------------------------------------------------------


def inspect_checkpoint(checkpoint: str | Path, *, out: str | Path | None = None,
                       data: str | Path | None = None, batch_size: int = 8, seq: int | None = None,
                       device: str | None = None, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Inspect a checkpoint, write the report directory and return the summary (also written as
    ``summary.json``). ``out`` defaults to ``<run_dir>/inspect/step-<step>``; an existing
    directory is only written into when it is empty or an earlier report (holds summary.json),
    so a mistyped ``--out`` never overwrites someone's files."""
    from ..train.inference import check_shards, find_run_data, load_trained

    model, cfg, tok, info = load_trained(checkpoint, device=device, tokenizer=tokenizer)
    seq = cfg.train.seq_len if seq is None else seq
    if not 1 <= seq <= cfg.model.max_seq_len:
        raise ConfigError(f"--seq must be in [1, {cfg.model.max_seq_len}] (the model's max_seq_len), "
                          f"got {seq}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out_dir = _report_dir(out, info)
    if data is not None:
        data_dir = Path(data)
        if not (data_dir / "meta.json").is_file():
            raise DataError(f"--data {data_dir} is not a prepared directory (no meta.json); "
                            "make one with `hyperbit prepare`")
    elif (data_dir := find_run_data(cfg, info["run_dir"])) is None:
        raise DataError(f"cannot find the data checkpoint {info['path']} was trained on (data.path="
                        f"{cfg.data.path!r}, or the run's data/ dir); pass a prepared directory with --data")
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
        "batch": {"data": str(data_dir), "split": "val", "windows": int(x.shape[0]), "seq_len": seq,
                  "tokens": int(x.numel())},
        "loss": result["loss"],
        "output_rms": result["output_rms"],
        "connection_matrix": learned,
        "embedding_in_output": _embedding_in_output(learned["C"]),
        "references": {name: {"definition": REFERENCE_DEFINITIONS[name], "C": [_floats(r) for r in m]}
                       for name, m in reference_matrices(K).items()},
        "collapse": {"pairs": [f"{a}-{b}" for a, b in zip(labels[1:], labels[2:])], **result["collapse"]},
        "composite_gain": result["composite_gain"],
        "grad_norm": result["grad_norm"],
        "dynamic_weights": result["dynamic_weights"],
        "monitors": None if run_dir is None else read_monitors(Path(run_dir) / "metrics.jsonl"),
    }
    summary["out_dir"] = str(out_dir)
    _write_report(out_dir, summary, labels)
    return summary


def cmd_inspect(args: argparse.Namespace) -> int:
    """``hyperbit inspect``: write the report, then print a short summary (or the JSON)."""
    summary = inspect_checkpoint(args.checkpoint, out=args.out, data=args.data, batch_size=args.batch_size,
                                 seq=args.seq, device=args.device, tokenizer=args.tokenizer)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_human(summary))
    return 0


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
    names = [name for name in PLOT_FILES if _PLOTS[name][1](summary)]
    summary["files"] = [SUMMARY_FILE, *names]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    plt = pyplot()
    for name in PLOT_FILES:
        if name in names:
            save(_PLOTS[name][0](plt, summary, labels), out_dir / name)
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


def _human(s: dict[str, Any]) -> str:
    m = s["config"]["model"]
    kind = m["pathway"] if m["pathway"] != "hc" else ("DHC" if m["hc_dynamic"] else "SHC")
    streams = f", n={m['expansion_rate']}" if m["pathway"] not in ("prenorm", "postnorm") else ""
    c = s["collapse"]
    lines = [f"inspected step {s['step']} of {s['checkpoint']} ({kind}{streams}, {m['n_layers']} blocks) "
             f"on {s['batch']['tokens']:,} val tokens: loss {_fmt(s['loss'])}",
             f"  collapse at the last depth: median cos {_fmt(c['median'][-1])} "
             f"(5-95%: {_fmt(c['p05'][-1])} .. {_fmt(c['p95'][-1])})"]
    g = s["composite_gain"]
    lines.append(f"  composite gain at the last depth: row {_fmt(g['row'][-1])}, column {_fmt(g['col'][-1])}"
                 f"; max over depths {_fmt(g['max'])}" if g["row"] is not None
                 else f"  composite gain: not defined ({g['reason']})")
    e = s["embedding_in_output"]
    if e is not None:
        verdict = "near 0: the output has dropped the embedding" if e["near_zero"] else "not near 0"
        lines.append(f"  embedding weight in the output row: {_fmt(e['weight'])} "
                     f"({_fmt(e['relative_to_row_max'])} x the row's largest |c|; {verdict})")
    gn = s["grad_norm"]
    lines.append(f"  grad norm: total {_fmt(gn['total'])}, embedding {_fmt(gn['embed'])}, "
                 f"head {'tied' if gn['head'] is None else _fmt(gn['head'])}")
    lines.append(f"  wrote {len(s['files'])} files to {s['out_dir']}: {', '.join(s['files'])}")
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------


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
        arr = np.array([[_nan(v) for v in row] for row in C])
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
    ax.set_xticks(x, c["pairs"], rotation=60, fontsize=7)
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
    ax.set_xticks(x, labels[1:], fontsize=7)
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
    ax.set_xlabel("block")
    ax.set_ylabel("gradient L2 norm")
    head = "tied" if gn["head"] is None else _fmt(gn["head"])
    ax.set_title(f"gradient norms (embedding {_fmt(gn['embed'])}, head {head}, total {_fmt(gn['total'])})",
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
    handles, names = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, names, loc="center")
    fig.suptitle("dynamic connection weights over the batch's tokens", fontsize=10)
    return fig


def _plot_monitors(plt, s: dict[str, Any], labels: list[str]) -> Any:
    mon = s["monitors"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(mon["step"], _arr(mon["gain_row_last"]), marker=".", label="max abs row sum")
    left.plot(mon["step"], _arr(mon["gain_col_last"]), marker=".", label="max abs column sum")
    _log_if_wide(left, mon["gain_row_last"] + mon["gain_col_last"])
    left.set_title("composite gain at the last depth", fontsize=9)
    left.legend(fontsize=8)
    right.plot(mon["step"], _arr(mon["collapse_median_mean"]), marker=".", color="C2")
    right.set_title("collapse: median cosine, mean over depth", fontsize=9)
    for ax in (left, right):
        ax.axvline(s["step"], color="0.5", linestyle="--", linewidth=1)  # the inspected checkpoint
        ax.set_xlabel("training step")
    return fig


#: file -> (draw(pyplot, summary, labels) -> figure, whether the summary has what it draws)
_PLOTS = {
    "connection_matrix.png": (_plot_connections, lambda s: True),
    "collapse.png": (_plot_collapse, lambda s: True),
    "gain.png": (_plot_gain, lambda s: s["composite_gain"]["row"] is not None),
    "grad_norm.png": (_plot_grads, lambda s: True),
    "dynamic_weights.png": (_plot_dynamic, lambda s: s["dynamic_weights"] is not None),
    "monitors.png": (_plot_monitors, lambda s: s["monitors"] is not None),
}
PLOT_FILES = tuple(_PLOTS)


# --- small helpers ------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A JSON-safe float: non-finite values (a diverged run) become null instead of invalid JSON."""
    v = float(x)
    return v if math.isfinite(v) else None


def _floats(t: Tensor | np.ndarray) -> list[float | None]:
    return [_num(v) for v in np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t).ravel()]


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _arr(values: list[float | None]) -> np.ndarray:
    return np.array([_nan(v) for v in values], dtype=np.float64)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _log_if_wide(ax, values: list[float | None]) -> None:
    """Log y axis when the positive values span more than a factor of 10."""
    pos = [v for v in values if v is not None and v > 0]
    if pos and max(pos) > 10 * min(pos):
        ax.set_yscale("log")

"""`hyperbit inspect` on tiny trained runs: the numbers in summary.json are the diagnostics computed
directly from the loaded model on the same batch, the references match hand-computed matrices,
the plots are real PNGs, and bad input (or an --out holding someone's files) ends in one line on
stderr with exit code 2 without touching anything."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperbit.cli import main
from hyperbit.data import TokenShards, prepare
from hyperbit.analysis import collapse, composite_gain, model_branch_weights, pathway_summary, unfold
from hyperbit.analysis.connections import from_matrix
from hyperbit.analysis.inspect import analyse, branch_labels, reference_matrices
from hyperbit.reports.inspect import read_monitors
from hyperbit.runs import load_trained

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["train.eval_every=0", "train.save_every=0", "train.eval_batches=1", "train.log_every=100"]
COMMON = {"connection_matrix.png", "collapse.png", "grad_norm.png"}
R = 2 ** -0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs, trained once for the module: DHCx2 (which prepares the byte-level data the
    others reuse), SHCx2, Pre-Norm, Post-Norm and a monitored DHCx2."""
    base = tmp_path_factory.mktemp("inspect")
    out = {"dhc": base / "dhc"}
    assert main(["train", "--preset", "tiny", "--out", str(out["dhc"]), "train.steps=4", *FAST,
                 "model.pathway=hc", "model.expansion_rate=2"]) == 0
    data = f"data.path={out['dhc'] / 'data'}"
    for name, steps, overrides in (("shc", 4, ["model.pathway=hc", "model.expansion_rate=2",
                                                "model.hc_dynamic=false"]),
                                   ("prenorm", 2, []), ("postnorm", 2, ["model.pathway=postnorm"]),
                                   # monitored at steps 3 and 6, in fp32, with dynamic weights that
                                   # have moved: the monitor's gain can be recomputed exactly
                                   ("dhc_monitored", 6, ["model.pathway=hc", "model.expansion_rate=2",
                                                         "train.monitor_every=3", "train.lr=1e-2",
                                                         "train.precision=fp32"])):
        out[name] = base / name
        assert main(["train", "--preset", "tiny", "--out", str(out[name]), f"train.steps={steps}", *FAST,
                     data, *overrides]) == 0
    return out


def _inspect(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["inspect", *args, "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["inspect", *args, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("hyperbit: error: ")
    return captured.err


def _batch(run: Path, batch: int = 8, seq: int = 32):
    """The batch inspect reads: the first ``batch`` validation windows of the run's data."""
    data_dir = json.loads((run / "config.json").read_text())["data"]["path"]
    data_dir = Path(data_dir) if (Path(data_dir) / "meta.json").exists() else run / "data"
    return next(TokenShards(data_dir, "val").iter_eval_batches(batch, seq))


def _has_monitors(run: Path) -> bool:
    return any('"monitor"' in line for line in (run / "metrics.jsonl").read_text().splitlines())


def _check_files(out: Path, summary: dict, expected: set[str]) -> None:
    if summary["monitors"] is not None:
        expected = expected | {"monitors.png"}
    assert set(summary["files"]) == expected | {"summary.json"}
    assert {p.name for p in out.iterdir()} == set(summary["files"])
    for name in expected:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert json.loads((out / "summary.json").read_text()) == summary


def _close(a, b, tol: float = 1e-6) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(torch.as_tensor(b, dtype=torch.float64))
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol


# --- references ---------------------------------------------------------------------------------


def test_reference_matrices_match_hand_computed_ones():
    refs = reference_matrices(2)
    assert torch.equal(refs["prenorm"], torch.tril(torch.ones(3, 3, dtype=torch.float64)))
    _close(refs["postnorm"], [[1, 0, 0], [R, R, 0], [0.5, 0.5, R]])
    # expand: both streams e. Branch 1 reads their sum 2e, resets both to 2e, writes T1 to stream 1;
    # branch 2 reads stream 2 (2e) and writes T2 there; the output is the sum 4e + T1 + T2.
    _close(refs["parallel_n2"], [[2, 0, 0], [2, 0, 0], [4, 1, 1]])
    refs = reference_matrices(3)
    _close(refs["postnorm"], [[1, 0, 0, 0], [R, R, 0, 0], [0.5, 0.5, R, 0], [R ** 3, R ** 3, 0.5, R]])
    # Branch 3 starts a new pair: it reads (2e + T1) + (2e + T2) and resets both streams to it.
    _close(refs["parallel_n2"], [[2, 0, 0, 0], [2, 0, 0, 0], [4, 1, 1, 0], [8, 2, 2, 1]])
    # Idealised Post-Norm keeps unit norm: uncorrelated unit contributions, squares sum to 1.
    post = reference_matrices(8)["postnorm"]
    assert torch.allclose(post.square().sum(1), torch.ones(9, dtype=torch.float64))
    assert branch_labels(2) == ["emb", "a1", "f1", "a2", "f2"]


# --- the report ---------------------------------------------------------------------------------


def test_dynamic_hc_report_equals_the_diagnostics_computed_directly(runs, capsys):
    run = runs["dhc"]
    summary = _inspect(capsys, str(run))
    out = run / "inspect" / "step-4"
    assert summary["out_dir"] == str(out) and summary["step"] == 4
    _check_files(out, summary, COMMON | {"gain.png", "dynamic_weights.png"})
    assert summary["batch"] == {"data": str(run / "data"), "split": "val", "windows": 8, "seq_len": 32,
                                "tokens": 256}
    assert (summary["monitors"] is not None) == _has_monitors(run)

    model, cfg, _, _ = load_trained(run, device="cpu")
    x, y = _batch(run)
    K = cfg.model.n_branches
    branches = model_branch_weights(model, x)
    C = unfold(branches)
    assert not torch.allclose(C, unfold(model_branch_weights(model, x[:1])))  # the batch matters
    _close(summary["connection_matrix"]["C"], C)
    assert summary["connection_matrix"]["token_average"] is True
    assert summary["connection_matrix"]["rows"] == ["a1", "f1", "a2", "f2", "out"]
    assert summary["embedding_in_output"]["weight"] == pytest.approx(float(C[-1, 0]), abs=1e-6)
    rows, cols = composite_gain(branches)
    _close(summary["composite_gain"]["row"], rows)
    _close(summary["composite_gain"]["col"], cols)
    direct = collapse(model, x)
    for key in ("median", "p05", "p95"):
        assert len(summary["collapse"][key]) == K - 1
        _close(summary["collapse"][key], direct[key])
    with torch.no_grad():
        _, loss = model(x, y)
        emb = model.embed(x)
    assert summary["loss"] == pytest.approx(loss.item(), abs=1e-5)
    rms = summary["output_rms"]  # embedding, then every branch output in execution order
    assert len(rms) == K + 1 and rms[0] == pytest.approx(emb.pow(2).mean(-1).sqrt().mean().item(), rel=1e-5)
    _close(summary["connection_matrix"]["C_times_rms"], C * torch.tensor(rms, dtype=torch.float64))

    gn = summary["grad_norm"]
    per_layer = gn["attn"] + gn["ffn"] + gn["pathway"]
    assert len(per_layer) == 3 * cfg.model.n_layers
    assert all(v > 0 and math.isfinite(v) for v in per_layer + [gn["embed"], gn["head"], gn["final_norm"]])
    parts = sum(v * v for v in per_layer) + gn["embed"] ** 2 + gn["head"] ** 2 + gn["final_norm"] ** 2
    assert gn["total"] == pytest.approx(math.sqrt(parts), rel=1e-9)  # every parameter in one group

    # The per-token weight quantiles, recomputed from the states the pathways receive.
    states = []
    hooks = [p.register_forward_pre_hook(lambda m, a: states.append(a[0])) for p in model.pathways()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    dyn = summary["dynamic_weights"]
    for k, (p, h) in enumerate(zip(model.pathways(), states)):
        with torch.no_grad():
            alpha, beta = p.connection_weights(h)
        home = k % 2
        expected = {"beta": beta, "a_m_home": alpha[..., home, 0], "a_m_other": alpha[..., 1 - home, 0],
                    "a_r_diag": alpha[..., [0, 1], [1, 2]], "a_r_offdiag": alpha[..., [0, 1], [2, 1]]}
        for group, values in expected.items():
            q = np.quantile(values.double().flatten().numpy(), [0.05, 0.25, 0.5, 0.75, 0.95])
            _close([dyn[group][key][k] for key in ("p05", "p25", "median", "p75", "p95")], q)
    assert dyn["beta"]["p05"][0] < dyn["beta"]["p95"][0]  # the weights do vary over tokens


def test_static_hc_report_unfolds_the_pathway_matrices(runs, capsys):
    run = runs["shc"]
    capsys.readouterr()
    assert main(["inspect", str(run), "--device", "cpu", "--batch-size", "2", "--seq", "16"]) == 0
    text = capsys.readouterr().out
    out = run / "inspect" / "step-4"
    summary = json.loads((out / "summary.json").read_text())
    assert f"wrote {len(summary['files'])} files to {out}" in text and "collapse at the last depth" in text
    _check_files(out, summary, COMMON | {"gain.png"})
    assert summary["batch"]["tokens"] == 32 and summary["dynamic_weights"] is None
    model, _, _, _ = load_trained(run, device="cpu")
    C = unfold([from_matrix(p.matrix()) for p in model.pathways()])
    _close(summary["connection_matrix"]["C"], C)
    assert summary["connection_matrix"]["token_average"] is False
    init = torch.tril(torch.ones(5, 5, dtype=torch.float64))
    init[-1] = 2.0  # the Pre-Norm-equivalent init, read out by summing n = 2 streams
    assert not torch.allclose(C, init, atol=1e-4)  # trained: the learned matrix, not the init


def test_prenorm_report_and_rewriting_an_old_report(runs, capsys, tmp_path):
    run = runs["prenorm"]
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier report: replaced file by file
    (out / "dynamic_weights.png").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    summary = _inspect(capsys, str(run / "checkpoints"), "--out", str(out))
    assert (out / "notes.txt").read_text() == "mine"  # not one of the report's files: kept
    assert not (out / "dynamic_weights.png").exists()  # stale plot of an earlier report: removed
    (out / "notes.txt").unlink()
    _check_files(out, summary, COMMON | {"gain.png"})
    _close(summary["connection_matrix"]["C"], torch.tril(torch.ones(5, 5)))
    assert summary["composite_gain"]["row"] == summary["composite_gain"]["col"] == [1.0] * 4
    assert summary["embedding_in_output"]["near_zero"] is False
    assert summary["dynamic_weights"] is None and summary["grad_norm"]["head"] > 0
    for name, C in reference_matrices(4).items():
        _close(summary["references"][name]["C"], C)
        assert summary["references"][name]["definition"]
    assert "sqrt(2)" in summary["references"]["postnorm"]["definition"]


def test_postnorm_has_no_learned_matrix_but_still_the_references(runs, capsys):
    summary = _inspect(capsys, str(runs["postnorm"]))
    out = runs["postnorm"] / "inspect" / "step-2"
    _check_files(out, summary, COMMON)  # no composite gain to draw
    assert summary["connection_matrix"]["C"] is None and "Post-Norm" in summary["connection_matrix"]["reason"]
    assert summary["composite_gain"]["row"] is None and summary["embedding_in_output"] is None
    assert len(summary["collapse"]["median"]) == 3 and set(summary["references"]) == {
        "prenorm", "postnorm", "parallel_n2"}


def test_analyse_leaves_no_gradients_behind(runs):
    model, _, _, _ = load_trained(runs["dhc"], device="cpu")
    x, y = _batch(runs["dhc"], 2, 16)
    result = analyse(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and result["loss"] > 0


def test_monitor_records_are_plotted(runs, capsys, tmp_path):
    run = runs["prenorm"]
    metrics = run / "metrics.jsonl"
    original = metrics.read_text()
    records = [{"step": 1001, "monitor": {"gain_row": [1.0, 2.0], "gain_col": [1.0, 3.0],
                                          "collapse_median": [0.5, 0.7], "collapse_p05": [0.1, 0.2],
                                          "collapse_p95": [0.9, 0.9]}},
               {"step": 1002, "monitor": {"gain_row": [1.0, 4.0], "gain_col": [1.0, 5.0],
                                          "collapse_median": [0.6, 0.8], "collapse_p05": [0.1, 0.2],
                                          "collapse_p95": [0.9, 0.9]}}]
    try:
        metrics.write_text(original + "".join(json.dumps(r) + "\n" for r in records) + '{"step": 10')
        summary = _inspect(capsys, str(run), "--out", str(tmp_path / "r"))
    finally:
        metrics.write_text(original)
    mon = summary["monitors"]
    assert mon["step"][-2:] == [1001, 1002] and mon["gain_row_last"][-2:] == [2.0, 4.0]
    assert mon["gain_col_last"][-2:] == [3.0, 5.0]
    assert mon["collapse_median_mean"][-2:] == pytest.approx([0.6, 0.7])
    assert (tmp_path / "r" / "monitors.png").read_bytes()[:8] == PNG
    assert read_monitors(tmp_path / "missing") is None


# --- bad input ----------------------------------------------------------------------------------


def test_out_holding_other_files_is_refused_untouched(runs, capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    err = _error(capsys, str(runs["prenorm"]), "--out", str(out))
    assert str(out) in err and "summary.json" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _error(capsys, str(runs["prenorm"]), "--out", str(tmp_path / "file"))


def test_bad_input_is_one_line_and_exit_2(runs, capsys, tmp_path):
    assert "does not exist" in _error(capsys, str(tmp_path / "nope"))
    run = str(runs["prenorm"])
    assert "--seq" in _error(capsys, run, "--seq", "0", "--out", str(tmp_path / "a"))
    assert "--seq" in _error(capsys, run, "--seq", "100000", "--out", str(tmp_path / "a"))
    assert "--batch-size" in _error(capsys, run, "--batch-size", "0", "--out", str(tmp_path / "a"))
    assert "hyperbit prepare" in _error(capsys, run, "--data", str(tmp_path), "--out", str(tmp_path / "a"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i} about streams and hyper connections" for i in range(60)))
    prepare(corpus, tmp_path / "bpe", tokenizer="bpe", vocab_size=280, val_fraction=0.3)
    assert "different tokenizer" in _error(capsys, run, "--data", str(tmp_path / "bpe"), "--out",
                                           str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    # A checkpoint outside its run: no default report dir and no data of its own.
    step = tmp_path / "step_00000004"
    shutil.copytree(runs["dhc"] / "checkpoints" / "step_00000004", step)  # data.path=pystdlib
    assert "--out" in _error(capsys, str(step))
    if not (Path("pystdlib") / "meta.json").exists():  # data.path is relative to the cwd
        assert "--data" in _error(capsys, str(step), "--out", str(tmp_path / "b"))
    summary = _inspect(capsys, str(step), "--out", str(tmp_path / "b"), "--data", str(runs["dhc"] / "data"))
    assert summary["run_dir"] is None and summary["monitors"] is None


# --- the monitors beside this report ------------------------------------------------------------


def _monitor_figure(gain_row, gain_col, mon_row, mon_col, dynamic=True):
    """monitors.png's figure for a summary with one monitor record, at the inspected step 30."""
    from hyperbit.reports.inspect_figures import PLOTS
    from hyperbit.reports.plots import pyplot

    summary = {"step": 30, "batch": {"windows": 8, "seq_len": 32}, "dynamic_weights": {} if dynamic else None,
               "composite_gain": {"row": gain_row, "col": gain_col},
               "monitors": {"step": [30], "gain_row_last": mon_row, "gain_col_last": mon_col,
                            "collapse_median_mean": [0.8], "batch": {"windows": 2, "seq_len": 32}}}
    fig = PLOTS["monitors.png"][0](pyplot(), summary, branch_labels(2))
    fig.tight_layout()
    fig.canvas.draw()
    return fig


def test_monitors_panel_one_record_and_this_reports_gain():
    fig = _monitor_figure([1.0, 1.25], [1.0, 1.5], [1.2], [1.4])
    left, right = fig.axes
    for ax in (left, right):  # one record at step 30: 0 .. 31.5 with whole steps, not 28.5 .. 31.5
        assert ax.get_xlim() == pytest.approx((0.0, 31.5))
        assert all(float(t).is_integer() for t in ax.get_xticks())
    points = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in left.get_lines()}
    assert points["max abs row sum (monitor)"] == ([30], [1.2])
    assert points["row sum (this report)"] == ([30], [1.25])  # the report's own gain beside it
    assert points["column sum (this report)"] == ([30], [1.5])
    title = fig._suptitle.get_text()
    assert "each on 2 val windows x 32 tokens" in title and "8 x 32 tokens" in title
    assert "dynamic weights are averaged over a batch's tokens" in title
    static = _monitor_figure([1.0, 1.25], [1.0, 1.5], [1.25], [1.5], dynamic=False)
    assert "dynamic" not in static._suptitle.get_text()


def test_postnorm_monitors_panel_draws_no_gain():
    """Post-Norm has no gain: none is drawn, even from records written before the monitor knew
    (gain 1): inspect's own gain is undefined, so is the panel's."""
    for logged in ([None], [1.0]):
        left = _monitor_figure(None, None, logged, logged).axes[0]
        assert [line.get_label() for line in left.get_lines() if not line.get_label().startswith("_")] == []
        assert [line.get_xdata()[0] for line in left.get_lines()] == [30]  # the inspected step's line only
        assert "not defined" in " ".join(t.get_text() for t in left.texts)


def test_one_pair_collapse_axis():
    from matplotlib.collections import LineCollection

    from hyperbit.reports.inspect_figures import PLOTS
    from hyperbit.reports.plots import pyplot

    summary = {"collapse": {"pairs": ["a1-f1"], "median": [0.9], "p05": [0.8], "p95": [0.97]}}
    ax = PLOTS["collapse.png"][0](pyplot(), summary, branch_labels(1)).axes[0]
    assert ax.get_xlim() == (0.5, 1.5)
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]  # a band of one pair: a bar
    assert [list(s[:, 1]) for c in bars for s in c.get_segments()] == [pytest.approx([0.8, 0.97])]


def test_monitor_gain_batch_is_stated_and_each_gain_is_its_own_batchs(runs, capsys):
    """The monitor's gain at the inspected step differs from inspect's for dynamic HC: summary.json
    states the batch of each, and recomputing each gain on the batch it names gives that gain."""
    run = runs["dhc_monitored"]
    capsys.readouterr()
    assert main(["inspect", str(run), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((run / "inspect" / "step-6" / "summary.json").read_text())
    mon = summary["monitors"]
    assert mon["batch"] == {"split": "val", "windows": 2, "seq_len": 32, "tokens": 64, "precision": "fp32"}
    assert summary["batch"]["windows"] == 8 and summary["batch"]["seq_len"] == 32
    assert "monitors.batch" in mon["note"] and "Dynamic hyper-connections" in mon["note"]
    assert mon["step"] == [3, 6]
    model, _, _, _ = load_trained(run, device="cpu")
    x, _ = _batch(run)
    b = mon["batch"]
    own = pathway_summary(model, x[: b["windows"], : b["seq_len"]])
    assert mon["gain_row_last"][-1] == pytest.approx(own["gain_row"][-1], abs=1e-6)
    assert mon["gain_col_last"][-1] == pytest.approx(own["gain_col"][-1], abs=1e-6)
    mine = summary["composite_gain"]["row"][-1]
    assert mine == pytest.approx(pathway_summary(model, x)["gain_row"][-1], abs=1e-6)
    assert abs(mine - mon["gain_row_last"][-1]) > 1e-5  # the two batches give different gains (6e-5)
    g = mon["gain_row_last"][-1], mon["gain_col_last"][-1]
    assert (f"training monitor at step 6: gain row {g[0]:.4g}, column {g[1]:.4g} on its own batch "
            "(2 val windows x 32 tokens, this report 8 x 32; dynamic weights are averaged over each "
            "batch's tokens, so the gains can differ)") in text


def test_postnorm_monitor_gain_is_null(runs, capsys, tmp_path):
    run = runs["postnorm"]
    metrics = run / "metrics.jsonl"
    logged = [json.loads(line)["monitor"] for line in metrics.read_text().splitlines() if '"monitor"' in line]
    assert logged[-1]["gain_row"] is None and logged[-1]["gain_col"] is None  # null in metrics.jsonl
    assert len(logged[-1]["collapse_median"]) == 3
    summary = _inspect(capsys, str(run), "--out", str(tmp_path / "a"))
    assert summary["monitors"]["gain_row_last"] == summary["monitors"]["gain_col_last"] == [None]
    mean = np.mean(logged[-1]["collapse_median"])
    assert summary["monitors"]["collapse_median_mean"][0] == pytest.approx(mean)
    # a record from before the monitor knew Post-Norm (gain 1) is not read as a gain either
    original = metrics.read_text()
    old = {**logged[-1], "gain_row": [1.0] * 4, "gain_col": [1.0] * 4}
    try:
        metrics.write_text(original + json.dumps({"step": 1001, "monitor": old}) + "\n")
        summary = _inspect(capsys, str(run), "--out", str(tmp_path / "b"))
        capsys.readouterr()
        assert main(["inspect", str(run), "--device", "cpu", "--out", str(tmp_path / "c")]) == 0
        text = capsys.readouterr().out
    finally:
        metrics.write_text(original)
    assert summary["monitors"]["step"] == [2, 1001]
    assert summary["monitors"]["gain_row_last"] == summary["monitors"]["gain_col_last"] == [None, None]
    assert ("training monitors: 2 records, each on 2 val windows x 32 tokens, this report 8 x 32; "
            "no gain") in text

"""A frac-connection LM as a whole: parameter counts, the wiring check, the training monitors and
``inspect`` analyses (unfolded connection matrix, composite gain, collapse), generation, and the
``fracM`` arms of ``hyperbit compare``."""

from __future__ import annotations

import types

import pytest
import torch

import hyperbit as hb
from hyperbit.analysis import (check_wiring, collapse, composite_gain, model_branch_weights,
                               pathway_summary, unfold)
from hyperbit.analysis.collapse import branch_inputs
from hyperbit.analysis.connections import frac_weights, output_weights
from hyperbit.analysis.inspect import analyse
from hyperbit.models import generate
from hyperbit.pathways import FracConnection
from hyperbit.reports.compare import grid

SHAPE = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=16)


def tiny(**kw) -> hb.TransformerLM:
    return hb.build_model(hb.ModelConfig(**{**SHAPE, **kw}))


def move(model, seed=0, scale=0.3):
    """Connection weights away from the identity init (and live dynamic weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "static_" in name or "dynamic_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def idx_batch(B=2, T=8, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# --- parameter counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 4, 32])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("extra", [{}, dict(tie_embeddings=True, linear="bitnet", n_kv_heads=2)],
                         ids=["plain", "tied-bitnet-gqa"])
def test_param_count_matches_the_formula_and_the_real_count(m, dynamic, extra):
    cfg = hb.ModelConfig(**SHAPE, **extra, pathway="frac", frac_rate=m, hc_dynamic=dynamic)
    model = hb.build_model(cfg, "meta")
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_params() == real == hb.count_params(cfg)
    prenorm = hb.count_params(hb.ModelConfig(**SHAPE, **extra))
    d, c, L = SHAPE["dim"], SHAPE["dim"] // m, SHAPE["n_layers"]
    per_branch = m * (2 * m + 1) + ((c * (2 * m + 1) + 2) if dynamic else 0)  # module docstring
    assert real - prenorm == 2 * L * per_branch
    one = FracConnection(d, m, 0, dynamic=dynamic)
    assert sum(p.numel() for p in one.parameters()) - d == per_branch  # minus the branch norm


# --- the wiring check ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(frac_rate=1, hc_dynamic=False), dict(frac_rate=2, hc_dynamic=False),
                                dict(frac_rate=4), dict(frac_rate=4, hc_tanh=False),
                                dict(frac_rate=2, linear="bitnet")], ids=str)
@pytest.mark.parametrize("moved", [False, True])
def test_wiring_check_passes(kw, moved):
    torch.manual_seed(0)
    model = tiny(pathway="frac", **kw)
    if moved:  # the skip path is the pathways' own (A_r != I), not a hard-coded identity
        move(model)
    report = check_wiring(model)
    assert report.ok, str(report)


@pytest.mark.parametrize("moved", [False, True])
def test_wiring_check_flags_x_plus_x(moved):
    torch.manual_seed(0)
    model = tiny(pathway="frac", frac_rate=4)
    if moved:
        move(model)

    def forward(self, h, cache=None):
        h = self.attn_path(h, self.attn)
        h = h + h  # the bug: the block's own input lost, the branch output doubled
        return self.ffn_path(h, self.ffn)

    model.blocks[1].forward = types.MethodType(forward, model.blocks[1])
    report = check_wiring(model)
    assert not report.ok and not report.checks["skip path"] and not report.checks["chain"]
    assert any(p.startswith("block 1:") for p in report.problems), str(report)
    assert not any(p.startswith(("block 0", "block 2")) for p in report.problems), str(report)


# --- connection matrix, gain, collapse, monitors, inspect ---------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_at_init_the_analyses_are_pre_norms(dynamic):
    torch.manual_seed(0)
    ref = tiny()
    model = tiny(pathway="frac", frac_rate=4, hc_dynamic=dynamic)
    model.load_state_dict(ref.state_dict(), strict=False)
    idx = idx_batch()
    C = unfold(model_branch_weights(model, idx), output_weights(model.pathways()))
    assert torch.allclose(C, torch.tril(torch.ones(7, 7, dtype=torch.float64)), atol=1e-12)
    rows, cols = composite_gain(model_branch_weights(model, idx))
    assert rows.tolist() == cols.tolist() == [1.0] * 6
    for x, x_ref in zip(branch_inputs(model, idx), branch_inputs(ref, idx)):
        torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-6)  # concat(A_m^T F) = h
    got, want = pathway_summary(model, idx), pathway_summary(ref, idx)
    assert got["gain_row"] == want["gain_row"] == [1.0] * 6
    assert got["collapse_median"] == pytest.approx(want["collapse_median"], abs=1e-5)


def test_m1_analyses_equal_the_n1_hyper_connection():
    """With one fraction a frac-connection is the n = 1 hyper-connection: same matrices."""
    torch.manual_seed(0)
    frac = move(tiny(pathway="frac", frac_rate=1, hc_dynamic=False))
    hc = tiny(pathway="hc", expansion_rate=1, hc_dynamic=False)
    hc.load_state_dict(frac.state_dict())  # same names and shapes: [A_m | A_r] (1, 2), B (1,)
    torch.testing.assert_close(frac(idx_batch())[0], hc(idx_batch())[0], rtol=1e-5, atol=1e-5)
    C_frac = unfold(model_branch_weights(frac), output_weights(frac.pathways()))
    torch.testing.assert_close(C_frac, unfold(model_branch_weights(hc)))
    for a, b in zip(composite_gain(model_branch_weights(frac)), composite_gain(model_branch_weights(hc))):
        torch.testing.assert_close(a, b)


def test_unfold_is_the_entry_mean_of_the_fraction_matrices():
    """c_kj = 1^T diag(B_j) A_r^{j+1} ... A_r^{k-1} A_m^k 1 / m, written out with full matrices;
    the output row concatenates the fractions (A_m = I there)."""
    torch.manual_seed(0)
    m, model = 3, move(tiny(dim=24, pathway="frac", frac_rate=3, hc_dynamic=False))
    paths = model.pathways()
    K = len(paths)
    A_m = [p.static_alpha.detach().double()[:, :m] for p in paths]
    A_r = [p.static_alpha.detach().double()[:, m:] for p in paths]
    Bd = [torch.eye(m, dtype=torch.float64)] + [torch.diag(p.static_beta.detach().double()) for p in paths]
    expected = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    for k in range(1, K + 2):
        read = A_m[k - 1] if k <= K else torch.eye(m, dtype=torch.float64)
        for j in range(k):
            M = Bd[j]
            for i in range(j + 1, k):
                M = M @ A_r[i - 1]
            expected[k - 1, j] = (M @ read).sum() / m
    C = unfold(model_branch_weights(model), output_weights(paths))
    torch.testing.assert_close(C, expected)
    # without the frac output read the last row would be m times too large
    assert torch.allclose(unfold(model_branch_weights(model))[-1], m * expected[-1])
    rows, _ = composite_gain(model_branch_weights(model))
    product = torch.linalg.multi_dot(A_r) if K > 1 else A_r[0]
    assert rows[-1] == pytest.approx(float(product.abs().sum(1).max()))


def test_frac_weights_splits_alpha():
    alpha = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])  # [A_m | A_r], m = 2
    w = frac_weights(alpha, torch.tensor([0.5, 2.0]))
    assert w.a_m.tolist() == [1.5, 5.5] and w.a_r.tolist() == [[3, 4], [7, 8]] and w.beta.tolist() == [0.5, 2]


def test_monitor_summary_and_inspect_analysis_on_a_trained_like_dynamic_model():
    torch.manual_seed(0)
    model = move(tiny(pathway="frac", frac_rate=4))
    idx = idx_batch()
    got = pathway_summary(model, idx)
    rows, cols = composite_gain(model_branch_weights(model, idx))
    assert got["gain_row"] == pytest.approx(rows.tolist(), abs=1e-6)
    assert got["gain_col"] == pytest.approx(cols.tolist(), abs=1e-6)
    assert max(got["gain_row"]) > 1.01  # the mixing moved: a non-trivial check
    stats = collapse(model, idx)
    for key in ("median", "p05", "p95"):
        assert got[f"collapse_{key}"] == pytest.approx(stats[key].tolist(), abs=1e-6)
    # the collapse inputs are concat(A_m^T F) with the per-token weights
    x0 = branch_inputs(model, idx)[0]
    path = model.blocks[0].attn_path
    F = path.expand(model.embed(idx)).detach()
    A_m = path.connection_weights(F)[0][..., :4]  # (B, T, m, m)
    want = torch.einsum("btji,btjc->btic", A_m, F).flatten(-2)
    torch.testing.assert_close(x0, want, rtol=1e-5, atol=1e-6)

    result = analyse(model, idx, idx.roll(-1, 1))
    assert result["connection_matrix"]["token_average"] is True
    C = torch.tensor(result["connection_matrix"]["C"], dtype=torch.float64).view(7, 7)
    torch.testing.assert_close(C, unfold(model_branch_weights(model, idx), output_weights(model.pathways())),
                               rtol=1e-4, atol=1e-6)
    assert result["composite_gain"]["row"] == pytest.approx(rows.tolist(), rel=1e-4)
    dyn = result["dynamic_weights"]
    for group in ("a_m_home", "a_m_other", "beta", "a_r_diag", "a_r_offdiag"):
        assert dyn[group] is not None and len(dyn[group]["median"]) == 6, group
    # a_m_home is A_m's diagonal: its median is near the moved static diagonal, not near 0
    static_diag = model.blocks[0].attn_path.static_alpha.detach()[:, :4].diagonal()
    assert abs(dyn["a_m_home"]["median"][0] - float(static_diag.median())) < 0.2


def test_static_frac_inspect_has_no_dynamic_weights():
    torch.manual_seed(0)
    model = move(tiny(pathway="frac", frac_rate=2, hc_dynamic=False))
    idx = idx_batch()
    result = analyse(model, idx, idx.roll(-1, 1))
    assert result["dynamic_weights"] is None and result["connection_matrix"]["token_average"] is False
    C = torch.tensor(result["connection_matrix"]["C"], dtype=torch.float64).view(7, 7)
    torch.testing.assert_close(C, unfold(model_branch_weights(model), output_weights(model.pathways())))


# --- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_greedy_generation_with_and_without_cache_agree(dynamic):
    torch.manual_seed(0)
    model = move(tiny(pathway="frac", frac_rate=4, hc_dynamic=dynamic)).eval()
    prompt = idx_batch(T=4)
    with_cache = generate(model, prompt, 6, temperature=0)
    without = generate(model, prompt, 6, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


# --- hyperbit compare arms ----------------------------------------------------------------------
def test_frac_arms():
    assert grid.arm_overrides("frac2") == ["model.pathway=frac", "model.expansion_rate=1",
                                           "model.hc_dynamic=True", "model.frac_rate=2"]
    assert grid.arm_overrides("sfrac4")[2:] == ["model.hc_dynamic=False", "model.frac_rate=4"]
    for bad in ("frac", "frac0", "dfrac2", "frac-2"):
        with pytest.raises(hb.ConfigError, match="fracM"):
            grid.arm_overrides(bad)
    specs = grid.plan("tiny", [], ["prenorm", "frac2", "sfrac4"], [], [0])
    models = {s.arm: s.config.model for s in specs}
    assert (models["prenorm"].pathway, models["prenorm"].frac_rate) == ("prenorm", 1)
    assert (models["frac2"].pathway, models["frac2"].frac_rate, models["frac2"].hc_dynamic) == ("frac", 2, True)
    assert (models["sfrac4"].frac_rate, models["sfrac4"].hc_dynamic) == (4, False)
    with pytest.raises(hb.ConfigError, match="model.frac_rate"):
        grid.plan("tiny", ["model.frac_rate=2"], ["frac2"], [], [0])


# --- end to end: train with monitors, then inspect ----------------------------------------------
@pytest.mark.slow  # ~10-30 s: a real (tiny) training run and its inspect report
def test_train_and_inspect_a_frac_run(tmp_path, capsys):
    import json

    from hyperbit.cli import main
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "model.pathway=frac", "model.frac_rate=4",
                 "train.steps=3", "train.monitor_every=2", "train.eval_every=0", "train.save_every=0",
                 "train.eval_batches=1", "data.max_bytes=20000"]) == 0
    monitors = [json.loads(line)["monitor"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "monitor" in json.loads(line)]
    assert monitors and all(len(m["gain_row"]) == 4 and len(m["collapse_median"]) == 3 for m in monitors)
    capsys.readouterr()
    assert main(["inspect", str(run), "--device", "cpu", "--json", "--batch-size", "2", "--seq", "16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    C = summary["connection_matrix"]["C"]
    assert len(C) == 5 and all(v is not None for row in C for v in row)
    assert summary["composite_gain"]["row"] is not None and summary["dynamic_weights"]["a_m_home"] is not None

"""mHC's own CPU kernels (``nn/native_mhc.py``) against their references: the PyTorch formulas,
the per-token map under autograd (``ManifoldHyperConnection._map``), and HC's kernels for the
mixing. Token counts span several blocks and groups of tokens and their tails; rows are not a whole
number of vectors."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn import native, native_mhc
from hyperbit.nn.norm import rms_rstd
from hyperbit.pathways import ManifoldHyperConnection
from hyperbit.pathways import sinkhorn as sk
from hyperbit.pathways._mhc_fused import alpha_of

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the PyTorch path runs")

SK_ARGS = (20, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)


def _map_reference(n, z, b, a):
    """alpha = [pre | res^T], post and the leaves (z, the biases, the gates) of the map under
    autograd, for the packed ``b`` = [b_pre | b_post | b_res] and ``a`` = [a_pre, a_post, a_res]."""
    mhc = ManifoldHyperConnection(8, n, 1).to(z.dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (z, *b.split([n, n, n * n]), *a.split(1))]
    pre, post, res = mhc._map(*leaves)
    return alpha_of(pre, res), post, leaves


def _width_case(N, n, d, dtype, gates=(0.5, 0.7, 0.9), seed=11):
    """Streams, projections, biases, gates, norm gain and upstream gradients, and the forward
    kernel's results for them (tested against their references below)."""
    g = torch.Generator().manual_seed(seed)
    r_ = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    m = 2 * n + n * n
    h, phi, b = r_(N, n, d), 0.1 * r_(m, n * d), r_(m)
    a, norm_w = torch.tensor(gates, dtype=dtype), 1 + 0.3 * r_(d)
    (x, _, _, rstd), (z, r, logits, alpha, post) = native_mhc.mhc_forward(
        h, phi, 1e-6, b, a, *SK_ARGS, False, norm_w, 1e-5, False)
    return dict(h=h, phi=phi, b=b, a=a, norm_w=norm_w, x=x, z=z, r=r, logits=logits, alpha=alpha, post=post,
                norm=(rstd, norm_w, True), g_out=r_(N, d), g_mixed=r_(N, n, d), g_post=r_(N, n),
                beta=r_(N, n), y=r_(N, d))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("N,K,m", [(37, 20, 8), (16, 128, 24), (3, 5, 1)])
def test_the_projection_kernel_matches_the_formula(N, K, m, dtype, tol):
    """z = (x phi^T) rsqrt(mean(x^2) + eps) and the rstd, for groups of tokens and their tail, rows
    of phi beyond the last whole slice, and rows that are not a whole number of vectors."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, K, generator=g, dtype=dtype)
    phi = torch.randn(m, K, generator=g, dtype=dtype)
    z, r = native_mhc.mhc_project(x, phi, 1e-6)
    r_ref = rms_rstd(x, 1e-6)
    torch.testing.assert_close(r, r_ref, rtol=tol, atol=0)
    torch.testing.assert_close(z, (x @ phi.T) * r_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,d,N", [(4, 20, 300), (2, 64, 37), (3, 16, 5)])
@pytest.mark.parametrize("mixed,save_bf16", [(True, True), (False, False)])
@pytest.mark.parametrize("gates", [(0.5, 0.7, 0.9), (1e4, -1e4, 1e4)])  # the second: extreme logits
def test_the_one_pass_forward_matches_its_references(n, d, N, mixed, save_bf16, gates, dtype, tol):
    """mhc_forward: the projection as mhc_project, the map (logits, alpha, post) as ``_map`` under
    autograd, also with the logits far out (the Sinkhorn's floor), and the mixing, branch norm and
    bf16 copy as HC's hc_forward with that alpha; with and without the mixed streams."""
    t = _width_case(N, n, d, dtype, gates)
    (x, mix, saved, rstd), (z, r, logits, alpha, post) = native_mhc.mhc_forward(
        t["h"], t["phi"], 1e-6, t["b"], t["a"], *SK_ARGS, save_bf16, t["norm_w"], 1e-5, mixed)
    z_ref, r_ref = native_mhc.mhc_project(t["h"].reshape(N, n * d), t["phi"], 1e-6)
    alpha_ref, post_ref, _ = _map_reference(n, z_ref, t["b"], t["a"])
    x_ref, mix_ref, _, rstd_ref = native.hc_forward(t["h"], alpha_ref.detach(), False, t["norm_w"], 1e-5, mixed)
    assert torch.equal(z, z_ref) and torch.equal(r, r_ref)
    logits_ref = t["a"][2] * z_ref[:, 2 * n:] + t["b"][2 * n:]
    for got, want in [(logits, logits_ref.view(N, n, n)), (alpha, alpha_ref), (post, post_ref), (x, x_ref),
                      (rstd, rstd_ref)] + ([(mix, mix_ref)] if mixed else []):
        torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)
    assert torch.isfinite(alpha).all()
    assert (mix is None) == (not mixed) and (saved is None) == (not save_bf16)
    if save_bf16:
        assert torch.equal(saved, t["h"].to(torch.bfloat16))


def _mhc_backward_inputs(N, n, d, m, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(h=r(N, n, d), alpha=r(N, n, n + 1), g_xn=r(N, d), g_mixed=r(N, n, d), g_p=r(N, m), coef=r(N),
                phi=r(m, n * d), beta=r(N, n), y=r(N, d))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("with_mixed", [True, False])
@pytest.mark.parametrize("n,d,N", [(4, 20, 300), (2, 64, 13), (3, 16, 8)])
def test_the_second_backward_pass_matches_its_formula(n, d, N, with_mixed, dtype, tol):
    """mhc_backward: dL/dH = alpha-mixing of (g_x, g_mixed) + g_p phi - coef H per token, dL/dphi
    = g_p^T x and the depth backward before on dL/dH; with the streams given and rebuilt."""
    m = 2 * n + n * n
    t = _mhc_backward_inputs(N, n, d, m, dtype)
    h, alpha, g_mixed = t["h"], t["alpha"], t["g_mixed"] if with_mixed else None
    g_y, g_beta = torch.empty(N, d, dtype=dtype), torch.empty(N, n, dtype=dtype)
    g_h, g_phi = native_mhc.mhc_backward(h, alpha, t["g_xn"], g_mixed, t["g_p"], t["coef"], t["phi"],
                                         depth=(t["beta"], t["y"], g_y, g_beta))
    mix = alpha[..., 0:1] * t["g_xn"].unsqueeze(-2)
    if with_mixed:
        mix = mix + torch.einsum("tij,tjd->tid", alpha[..., 1:], g_mixed)
    ref = mix + (t["g_p"] @ t["phi"]).view(N, n, d) - t["coef"].view(N, 1, 1) * h
    torch.testing.assert_close(g_h, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_phi, t["g_p"].T @ h.reshape(N, n * d), rtol=tol, atol=10 * tol)
    torch.testing.assert_close(g_y, (t["beta"].unsqueeze(-1) * ref).sum(-2), rtol=tol, atol=tol)
    torch.testing.assert_close(g_beta, (ref * t["y"].unsqueeze(-2)).sum(-1), rtol=tol, atol=10 * tol)
    # the streams rebuilt per token (prev, alpha, beta, y: H = A_r^T prev + beta y)
    src = (t["h"].flip(0), alpha.flip(0), t["beta"].flip(0), t["y"].flip(0))
    rebuilt = native.hc_rebuild(*src, dtype)
    g_h2, g_phi2 = native_mhc.mhc_backward(None, alpha, t["g_xn"], g_mixed, t["g_p"], t["coef"], t["phi"], src)
    g_h3, g_phi3 = native_mhc.mhc_backward(rebuilt, alpha, t["g_xn"], g_mixed, t["g_p"], t["coef"], t["phi"])
    torch.testing.assert_close(g_h2, g_h3, rtol=tol, atol=tol)  # (the compiler may contract the
    torch.testing.assert_close(g_phi2, g_phi3, rtol=tol, atol=10 * tol)  # rebuild's FMAs otherwise)


def test_the_second_backward_pass_gives_the_same_bits_at_any_thread_count(same_bits_at_any_thread_count):
    t = _mhc_backward_inputs(700, 4, 32, 24, torch.float32)
    same_bits_at_any_thread_count(lambda: native_mhc.mhc_backward(
        t["h"], t["alpha"], t["g_xn"], t["g_mixed"], t["g_p"], t["coef"], t["phi"]))


def test_the_first_backward_pass_matches_hc_backward():
    """hc_alpha_backward: dL/dalpha and the norm's gain gradient as hc_backward computes them, and
    the branch input's dL/dx (before the norm) that hc_backward mixes into dL/dH."""
    n, d = 4, 37
    g = torch.Generator().manual_seed(3)
    h, alpha = torch.randn(3, 7, n, d, generator=g, dtype=torch.float64), torch.randn(3, 7, n, n + 1, generator=g,
                                                                                       dtype=torch.float64)
    norm_w = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    out, mixed, _, rstd = native.hc_forward(h, alpha, False, norm_w, 1e-5)
    g_out, g_mixed = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(mixed.shape, generator=g,
                                                                                       dtype=out.dtype)
    norm = (rstd, norm_w, True)
    g_h, g_alpha, _, g_w = native.hc_backward(h, alpha, g_out, g_mixed, None, None, None, None, None, 0.0, 0.0,
                                              False, norm=norm)
    g_alpha2, g_xn, g_w2 = native_mhc.hc_alpha_backward(h, alpha, g_out, g_mixed, norm)
    assert torch.equal(g_alpha2, g_alpha) and torch.equal(g_w2, g_w)
    g_h_ref = native.hc_backward(h, alpha, g_xn, g_mixed, None, None, None, None, None, 0.0, 0.0, False)[0]
    torch.testing.assert_close(g_h, g_h_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-4)])
@pytest.mark.parametrize("n,d,N", [(4, 20, 300), (2, 64, 37)])
@pytest.mark.parametrize("with_mixed,with_post", [(True, True), (False, False)])
@pytest.mark.parametrize("gates", [(0.5, 0.7, 0.9), (1e4, -1e4, 1e4)])  # the second: extreme logits
def test_the_one_pass_backward_matches_its_references(n, d, N, with_mixed, with_post, gates, dtype, tol):
    """mhc_backward_fused against the first pass (hc_alpha_backward), the map's reverse under
    autograd (``_map``; also with the logits far out: finite gradients), and the second pass
    (mhc_backward), with the depth backward before."""
    if dtype == torch.float32 and max(map(abs, gates)) > 100:
        # logits ~1e4: the map's reverse is ill-conditioned, and a build's vectorised exp rounds
        # its own way; the AVX2 build (-mno-avx512f) and the AVX-512 one differ from the autograd
        # reference by up to 8.8e-3 here (the latter by less than 2e-4). fp64 agrees to 1e-11 on both.
        tol = 2e-2
    t = _width_case(N, n, d, dtype, gates)
    g_mixed = t["g_mixed"] if with_mixed else None
    g_post = t["g_post"] if with_post else None
    depth = (t["beta"], t["y"], torch.empty(N, d, dtype=dtype), torch.empty(N, n, dtype=dtype))
    g_h, g_phi, g_par, g_w = native_mhc.mhc_backward_fused(
        t["h"], t["alpha"], t["g_out"], g_mixed, t["norm"], t["z"], t["r"], t["logits"], t["post"], g_post,
        t["a"], *SK_ARGS, t["phi"], depth=depth)
    g_alpha, g_xn, g_w_ref = native_mhc.hc_alpha_backward(t["h"], t["alpha"], t["g_out"], g_mixed, t["norm"])
    alpha_ref, post_ref, leaves = _map_reference(n, t["z"], t["b"], t["a"])
    outs, grads = [alpha_ref], [g_alpha]
    if with_post:
        outs.append(post_ref)
        grads.append(g_post)
    g_z, *g_small = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    g_par_ref = torch.cat([gs if gs is not None else torch.zeros_like(p) for gs, p in zip(g_small, leaves[1:])])
    coef = (g_z * t["z"]).sum(-1) * t["r"].squeeze(-1).square() / (n * d)
    depth_ref = (t["beta"], t["y"], torch.empty(N, d, dtype=dtype), torch.empty(N, n, dtype=dtype))
    g_h_ref, g_phi_ref = native_mhc.mhc_backward(t["h"], t["alpha"], g_xn, g_mixed, g_z * t["r"], coef, t["phi"],
                                                 depth=depth_ref)
    assert torch.isfinite(g_h).all() and torch.isfinite(g_par).all()
    for got, want in [(g_h, g_h_ref), (g_phi, g_phi_ref), (g_w, g_w_ref), (depth[2], depth_ref[2]),
                      (depth[3], depth_ref[3])]:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(g_par, g_par_ref, rtol=tol, atol=50 * tol * max(1.0, float(g_par_ref.abs().max())))


def test_the_one_pass_backward_gives_the_same_bits_at_any_thread_count(same_bits_at_any_thread_count):
    t = _width_case(400, 4, 32, torch.float32)
    same_bits_at_any_thread_count(lambda: native_mhc.mhc_backward_fused(
        t["h"], t["alpha"], t["g_out"], t["g_mixed"], t["norm"], t["z"], t["r"], t["logits"], t["post"],
        t["g_post"], t["a"], *SK_ARGS, t["phi"]))

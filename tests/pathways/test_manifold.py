"""mHC (spec section 7): the doubly stochastic maps, the connection against the spec's formulas,
its inits, dtypes, and the composite gain it bounds.

The reference here is written from the formulas as plain loops (Sinkhorn by division, not in the
log domain), independently of ``hyperbit.pathways.manifold``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hyperbit.analysis.connections import BranchWeights, composite_gain
from hyperbit.pathways import HyperConnection, ManifoldHyperConnection, expand_streams
from hyperbit.pathways.sinkhorn import (LOGIT_RANGE, _scale, _sinkhorn_reference, birkhoff,
                                        permutation_matrices, round_doubly_stochastic, sinkhorn)

torch.set_default_dtype(torch.float32)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def sums_error(m: torch.Tensor) -> float:
    """Largest distance of a row or column sum from 1."""
    m = m.detach()
    return max(float((m.sum(-1) - 1).abs().max()), float((m.sum(-2) - 1).abs().max()))


# ---------------------------------------------------------------------------------------------
# the doubly stochastic maps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0, 1e4])
def test_sinkhorn_rows_and_columns_sum_to_one(n, scale, device):
    """After the default 20 iterations, also where Sinkhorn alone is far from converged (logits of
    std >= 3: a third of random 4 x 4 matrices keep a row sum more than 1e-3 off)."""
    g = torch.Generator().manual_seed(n)
    logits = (scale * torch.randn(2000, n, n, generator=g)).to(device)
    res = sinkhorn(logits, 20)
    assert res.dtype == torch.float32 and torch.isfinite(res).all()
    assert res.min() >= 0
    assert sums_error(res) <= 1e-3
    assert sums_error(res) <= 1e-5  # in fact exact to fp32 round-off, thanks to the rounding step


def test_sinkhorn_extreme_logits_give_finite_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    signs = torch.randn(500, 4, 4, generator=g).sign()
    for logits in (1e4 * signs, torch.full((1, 4, 4), -1e4), torch.full((1, 4, 4), 1e4),
                   torch.diag_embed(torch.full((1, 4), 1e4)) - 1e4):
        logits = logits.clone().requires_grad_(True)
        res = sinkhorn(logits)
        assert torch.isfinite(res).all() and res.min() >= 0 and sums_error(res) <= 1e-3
        (res * torch.randn(res.shape, generator=g)).sum().backward()
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_custom_backward_matches_autograd_in_fp64(iters):
    """The recomputing backward against finite differences (gradcheck) and against plain autograd
    through the same iterations; few iterations exercise the rounding step far from converged."""
    g = torch.Generator().manual_seed(iters)
    logits = torch.randn(3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: sinkhorn(z, iters), (logits,))
    probe = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    (custom,) = torch.autograd.grad((sinkhorn(logits, iters) * probe).sum(), logits)
    (plain,) = torch.autograd.grad((_sinkhorn_reference(logits, iters) * probe).sum(), logits)
    torch.testing.assert_close(custom, plain, rtol=1e-12, atol=1e-14)


def test_sinkhorn_backward_matches_autograd_beyond_the_logit_floor():
    """Logits more than LOGIT_RANGE below their row's max are floored: like clamp_min under
    autograd, the hand-written backward gives them exactly zero gradient, and the rest of the
    gradient equals plain autograd's."""
    g = torch.Generator().manual_seed(0)
    logits = (30 * torch.randn(200, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    floored = logits - logits.amax(-1, keepdim=True) < -LOGIT_RANGE
    assert 0 < floored.sum() < floored.numel()  # both kinds of entry are present
    probe = torch.randn(200, 4, 4, generator=g, dtype=torch.float64)
    (custom,) = torch.autograd.grad((sinkhorn(logits, 20) * probe).sum(), logits)
    (plain,) = torch.autograd.grad((_sinkhorn_reference(logits, 20) * probe).sum(), logits)
    assert (custom[floored] == 0).all()
    torch.testing.assert_close(custom, plain, rtol=1e-9, atol=1e-12)


def log_domain_sinkhorn(logits, iters):
    """The textbook log-domain iteration (rows, then columns), written out independently."""
    z = logits
    for _ in range(iters):
        z = z - z.logsumexp(-1, keepdim=True)
        z = z - z.logsumexp(-2, keepdim=True)
    return z.exp()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("iters", [1, 2, 5, 20])
def test_sinkhorn_scaling_has_the_log_domain_iterates(dtype, tol, iters):
    """The scaling form reproduces the log-domain iterates (not only their limit), unconverged
    ones included, for logits that span up to LOGIT_RANGE in a row; and sinkhorn() is the
    rounding step applied to them."""
    g = torch.Generator().manual_seed(iters)
    logits = torch.cat([3 * torch.randn(300, 4, 4, generator=g, dtype=dtype),
                        (LOGIT_RANGE - 1) * torch.rand(300, 4, 4, generator=g, dtype=dtype)])
    ref = log_domain_sinkhorn(logits, iters)
    iterate = _scale(logits.permute(1, 2, 0).contiguous(), iters).permute(2, 0, 1)
    torch.testing.assert_close(iterate, ref, rtol=0, atol=tol)
    torch.testing.assert_close(sinkhorn(logits, iters), round_doubly_stochastic(ref), rtol=0, atol=4 * tol)


def test_sinkhorn_gradients_do_not_underflow_at_the_residual_init():
    """At the default init (res ~ I with 0.01 off the diagonal) every logit still gets a gradient."""
    mhc = ManifoldHyperConnection(16, 4, branch_index=1)
    logits = mhc.bias_res.detach().view(4, 4).clone().requires_grad_(True)
    probe = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    (sinkhorn(logits) * probe).sum().backward()
    assert (logits.grad.abs() > 1e-5).all(), logits.grad


def test_sinkhorn_agrees_with_plain_division_when_converged():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, 4, generator=g, dtype=torch.float64)
    m = logits.exp()
    for _ in range(2000):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    torch.testing.assert_close(sinkhorn(logits, 200), m, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_permutations_are_exactly_doubly_stochastic(n):
    perms = permutation_matrices(n)
    assert perms.shape == (math.factorial(n), n, n) and torch.equal(perms[0], torch.eye(n))
    assert torch.equal(perms.sum(-1), torch.ones(len(perms), n))
    assert torch.equal(perms.sum(-2), torch.ones(len(perms), n))
    assert len({tuple(p.flatten().tolist()) for p in perms}) == len(perms)
    g = torch.Generator().manual_seed(n)
    logits = 5 * torch.randn(100, len(perms), generator=g, dtype=torch.float64)
    res = birkhoff(logits, perms)
    assert res.min() >= 0 and sums_error(res) <= 1e-14
    # and it is the mixture it claims to be
    w = logits.softmax(-1)
    torch.testing.assert_close(res[7], sum(w[7, j] * perms[j].double() for j in range(len(perms))))


# ---------------------------------------------------------------------------------------------
# the connection against the spec's formulas
# ---------------------------------------------------------------------------------------------
def spec_rmsnorm(x, weight, eps):
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def reference_weights(mhc: ManifoldHyperConnection, H, iters=None):
    """Spec section 7, by hand: pre, post, res for every token."""
    n, d = mhc.expansion_rate, mhc.dim
    x = spec_rmsnorm(H.reshape(*H.shape[:-2], n * d), None, mhc.stream_eps)  # (B, T, nd)
    phi = mhc.phi.T  # (nd, k): columns [pre | post | res]
    pre = torch.sigmoid(mhc.gate_pre * (x @ phi[:, :n]) + mhc.bias_pre)
    post = 2 * torch.sigmoid(mhc.gate_post * (x @ phi[:, n:2 * n]) + mhc.bias_post)
    logits = mhc.gate_res * (x @ phi[:, 2 * n:]) + mhc.bias_res
    if mhc.res == "permutations":
        w = logits.softmax(-1)
        res = sum(w[..., j, None, None] * P for j, P in enumerate(permutation_matrices(n)))
    else:
        res = logits.unflatten(-1, (n, n)).exp()
        for _ in range(iters or mhc.sinkhorn_iters):
            res = res / res.sum(-1, keepdim=True)
            res = res / res.sum(-2, keepdim=True)
    return pre, post, res


def reference_mhc(mhc, H, branch, iters=None):
    """H <- res H + post^T T(norm(pre H)), as loops over streams."""
    n = H.shape[-2]
    pre, post, res = reference_weights(mhc, H, iters)
    x = sum(pre[..., i, None] * H[..., i, :] for i in range(n))  # pre H
    y = branch(spec_rmsnorm(x, mhc.norm.weight, mhc.norm.eps))
    out = []
    for i in range(n):
        mixed_i = sum(res[..., i, j, None] * H[..., j, :] for j in range(n))  # (res H)_i
        out.append(mixed_i + post[..., i, None] * y)
    return torch.stack(out, dim=-2)


def live_mhc(n=3, d=16, res="sinkhorn", init="residual", seed=0, scale=0.3):
    """Random, non-symmetric weights: live projections, gates and biases, non-trivial norm gain."""
    torch.manual_seed(seed)
    mhc = ManifoldHyperConnection(d, n, branch_index=1, res=res, init=init)
    with torch.no_grad():
        for name, p in mhc.named_parameters():
            p.add_((3 if name.startswith("gate") else 1) * scale * torch.randn_like(p))
    return mhc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["sinkhorn", "permutations"])
def test_mhc_matches_spec_formula_values_and_gradients(res, device):
    mhc = live_mhc(res=res, init="paper", scale=0.5).to(device)  # far from symmetric
    n, d = mhc.expansion_rate, mhc.dim
    H = torch.randn(2, 5, n, d, device=device, requires_grad=True)
    branch = torch.nn.Linear(d, d).to(device)
    probe = torch.randn(2, 5, n, d, device=device)
    iters = 200  # converged: the reference by division then needs no rounding step
    mhc.sinkhorn_iters = iters
    pre, post, res_m = reference_weights(mhc, H, iters)
    assert (res_m - res_m.transpose(-1, -2)).abs().max() > 1e-2  # a transposed res would show
    out_ref = reference_mhc(mhc, H, branch, iters)
    params = [H] + list(mhc.parameters())
    grads_ref = torch.autograd.grad((out_ref * probe).sum(), params)

    x, ctx = mhc.width_connection(H)
    out = mhc.depth_connection(ctx, branch(x))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    names = ["H"] + [k for k, _ in mhc.named_parameters()]
    for name, g, g_ref in zip(names, torch.autograd.grad((out * probe).sum(), params), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # the inference path
        torch.testing.assert_close(mhc(H, branch), out_ref, rtol=1e-5, atol=1e-5)
    # the analyses' view: A_m = pre, A_r = res^T, B = post
    alpha, beta = mhc.connection_weights(H)
    torch.testing.assert_close(alpha[..., 0], pre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha[..., 1:], res_m.transpose(-1, -2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(beta, post, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("res", ["sinkhorn", "permutations"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_inits(n, res):
    d, eps = 8, 1e-6
    H = expand_streams(torch.randn(2, 3, d), n)
    for k in range(5):
        mhc = ManifoldHyperConnection(d, n, branch_index=k, res=res, eps=eps)
        pre, post, res_m = mhc.mhc_weights(H)
        home = torch.arange(n) == k % n
        if n == 1:  # one stream: the biases are zero (pre = 1/2 is exact)
            assert torch.equal(pre, torch.full_like(pre, 0.5)) and torch.equal(res_m, torch.ones_like(res_m))
        else:
            torch.testing.assert_close(pre[..., home], torch.full_like(pre[..., home], 0.99))
            torch.testing.assert_close(pre[..., ~home], torch.full_like(pre[..., ~home], 0.01))
            eye = torch.eye(n, dtype=torch.bool)
            torch.testing.assert_close(res_m[..., eye], torch.full_like(res_m[..., eye], 1 - (n - 1) * 0.01))
            torch.testing.assert_close(res_m[..., ~eye], torch.full_like(res_m[..., ~eye], 0.01))
        assert torch.equal(post, torch.ones_like(post))
        s0 = float(pre[0, 0].detach().double().sum())
        assert mhc.norm.eps == pytest.approx(eps * s0 * s0, rel=1e-6)
        paper = ManifoldHyperConnection(d, n, branch_index=k, res=res, init="paper", eps=eps)
        pre, post, res_m = paper.mhc_weights(H)
        assert torch.equal(pre, torch.full_like(pre, 0.5)) and torch.equal(post, torch.ones_like(post))
        torch.testing.assert_close(res_m, torch.full_like(res_m, 1 / n), rtol=0, atol=1e-7)
        assert paper.norm.eps == pytest.approx(eps * (n / 2) ** 2, rel=1e-12)


@pytest.mark.parametrize("init", ["residual", "paper"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_at_init_one_branch_is_a_pre_norm_branch(n, init):
    """Equal streams h: every new stream is h + T(rmsnorm(h; eps)), whatever the init's pre."""
    torch.manual_seed(0)
    d = 16
    mhc = ManifoldHyperConnection(d, n, branch_index=3, init=init, eps=1e-3)  # an eps that matters
    h = 1e-2 * torch.randn(2, 5, d)
    branch = torch.nn.Linear(d, d)
    want = h + branch(spec_rmsnorm(h, None, 1e-3))
    torch.testing.assert_close(mhc(expand_streams(h, n), branch), expand_streams(want, n),
                               rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_one_line_errors():
    for kwargs, match in ((dict(expansion_rate=5, res="permutations"), "expansion_rate <= 4"),
                          (dict(expansion_rate=0), "expansion_rate"),
                          (dict(expansion_rate=2, init="identity"), "init='identity'"),
                          (dict(expansion_rate=2, res="softmax"), "res='softmax'"),
                          (dict(expansion_rate=2, sinkhorn_iters=0), "sinkhorn_iters")):
        with pytest.raises(ValueError, match=match):
            ManifoldHyperConnection(8, branch_index=0, **kwargs)
    with pytest.raises(ValueError, match="expand_streams"):
        ManifoldHyperConnection(8, 2, 0)(torch.randn(2, 3, 8), torch.nn.Identity())


def test_no_weight_decay_and_repr():
    mhc = ManifoldHyperConnection(8, 2, 0)
    params = dict(mhc.named_parameters())
    assert mhc.no_weight_decay() <= set(params)
    assert set(params) - mhc.no_weight_decay() == {"phi", "norm.weight"}  # norm: by the optimizer
    assert "expansion_rate=2" in repr(mhc) and "res=sinkhorn, iters=20" in repr(mhc)


# ---------------------------------------------------------------------------------------------
# composite gain: bounded for mHC, unbounded for unconstrained HC
# ---------------------------------------------------------------------------------------------
def test_composite_gain_of_32_branches_stays_bounded_unlike_hc():
    """32 branches with random weights of the same size (N(0, 0.3) added to every parameter, the
    gates 0.9 larger): the product of mHC's res matrices keeps its largest absolute row sum at 1;
    HC's A_r product grows."""
    n, d, K = 4, 16, 32
    torch.manual_seed(0)
    H = torch.randn(1, 8, n, d)
    gains = {}
    for kind in ("mhc", "hc"):
        branches = []
        for k in range(K):
            p = (ManifoldHyperConnection(d, n, k) if kind == "mhc" else HyperConnection(d, n, k))
            with torch.no_grad():
                for name, w in p.named_parameters():
                    w.add_((3 if name.startswith("gate") or name.endswith("_scale") else 1)
                           * 0.3 * torch.randn_like(w))
                alpha, beta = p.connection_weights(H)  # (1, 8, n, n+1) per token
            token = alpha[0, 5]  # one token's weights (no averaging that could hide growth)
            branches.append(BranchWeights(beta[0, 5], token[:, 0], token[:, 1:]))
        rows, cols = composite_gain(branches)
        gains[kind] = float(max(rows.max(), cols.max()))
    print(f"composite gain after {K} branches: mHC {gains['mhc']:.6f}, HC {gains['hc']:.4g}")
    assert gains["mhc"] <= 1 + 1e-3
    assert gains["hc"] > 10


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("res", ["sinkhorn", "permutations"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters_and_streams(dtype, res, device):
    """bf16 / fp16 parameters and streams: computed in fp32, rounded once to the streams' dtype;
    gradients in the parameter dtype, close to fp32's; fp32 streams under autocast stay fp32."""
    mhc = live_mhc(n=4, d=32, res=res).to(device)
    branch = torch.nn.Linear(32, 32).to(device)
    H = torch.randn(2, 6, 4, 32, device=device)
    out_ref = mhc(H, branch)
    with torch.autocast(device, dtype=torch.bfloat16):
        auto = mhc(H, branch)
        x, _ = mhc.width_connection(H)
    assert auto.dtype == x.dtype == torch.float32
    assert float((auto - out_ref).norm() / out_ref.norm()) <= 4 * 2.0**-8
    low, branch_low = copy.deepcopy(mhc).to(dtype), copy.deepcopy(branch).to(dtype)
    H_low = H.to(dtype).requires_grad_(True)
    out = low(H_low, branch_low)
    assert out.dtype == dtype and torch.isfinite(out).all()
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert float((out.double() - out_ref.double()).norm() / out_ref.double().norm()) <= 4 * u
    out.float().square().sum().backward()
    assert H_low.grad.dtype == dtype
    for name, p in low.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        assert low(H_low, branch_low).dtype == dtype

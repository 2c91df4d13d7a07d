"""mHC's memory-lean width connection (``_mhc_fused``) equals the plain-autograd path, and stays lean."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn import native
from hyperbit.pathways import ManifoldHyperConnection, _mhc_fused, expand_streams


@pytest.fixture(params=["native", "native-shared", "pytorch"])
def kernels(request, monkeypatch):
    """The three implementations of mHC's fused node: the C kernels, mHC's own kernels off (its
    projection, map and backward in PyTorch ops around the mixing kernels HC shares), and the
    PyTorch ops throughout (the path on CUDA, and without a C compiler)."""
    if request.param == "pytorch":
        monkeypatch.setenv("HYPERBIT_NATIVE", "0")
        return request.param
    if native.library() is None:
        pytest.skip("no C compiler: only the PyTorch path runs here")
    if request.param == "native-shared":
        monkeypatch.setattr(_mhc_fused, "MHC_KERNELS", False)
    return request.param


def _random_mhc(n, d, res, init, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mhc = ManifoldHyperConnection(d, n, branch_index=1, res=res, init=init).to(dtype)
    with torch.no_grad():
        for name, p in mhc.named_parameters():
            p.add_((3 if name.startswith("gate") else 1) * 0.3 * torch.randn_like(p))
    return mhc


def _run(mhc, h, reference, use_post=True):
    h = h.detach().clone().requires_grad_(True) if h.requires_grad is False else h
    width = mhc.width_connection_reference if reference else mhc.width_connection
    x, ctx = width(h)
    y = torch.tanh(x).roll(1, -1)  # a non-linear stand-in branch
    out = mhc.depth_connection(ctx, y) if use_post else ctx.mixed + y.unsqueeze(-2)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum()
    leaves = [h] + list(mhc.parameters())
    return out, torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_same(a, b, names, rtol, atol):
    out, grads = a
    out_ref, grads_ref = b
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    assert len(grads) == len(grads_ref) == len(names)
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, g_ref, rtol=rtol * 10, atol=atol * 10, msg=name)


@pytest.mark.parametrize("init", ["residual", "paper"])
@pytest.mark.parametrize("res", ["sinkhorn", "permutations"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_fused_matches_reference_values_and_gradients_fp64(n, res, init, kernels):
    mhc = _random_mhc(n, 12, res, init)
    h = torch.randn(2, 5, n, 12, dtype=torch.float64)
    names = ["h"] + [k for k, _ in mhc.named_parameters()]
    _assert_same(_run(mhc, h, False), _run(mhc, h, True), names, rtol=1e-10, atol=1e-12)


def test_fused_without_post_gradient_and_on_broadcast_streams():
    """A caller that never uses post (no gradient for it), and the first branch's input: n
    broadcast copies of the embedding (a zero-stride view)."""
    mhc = _random_mhc(4, 16, "sinkhorn", "residual")
    names = ["h"] + [k for k, _ in mhc.named_parameters()]
    h = torch.randn(3, 4, 4, 16, dtype=torch.float64)
    _assert_same(_run(mhc, h, False, use_post=False), _run(mhc, h, True, use_post=False), names,
                 rtol=1e-10, atol=1e-12)
    e = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    fused = _run(mhc, expand_streams(e, 4), False)
    ref = _run(mhc, expand_streams(e, 4), True)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(fused[1][1:], ref[1][1:]):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_matches_reference_in_low_precision_and_under_autocast(dtype, kernels):
    """bf16 / fp16 parameters and streams: both paths compute in fp32 and round once, so they
    agree to a few units of the low precision; under bf16 autocast only the saved copy of H is
    bf16, so values are exact and gradients close."""
    mhc = _random_mhc(4, 32, "sinkhorn", "residual", dtype=torch.float32)
    h = torch.randn(2, 8, 4, 32)
    names = ["h"] + [k for k, _ in mhc.named_parameters()]
    ref32 = _run(mhc, h, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _run(mhc, h, False)
    assert auto[0].dtype == torch.float32
    torch.testing.assert_close(auto[0], ref32[0], rtol=1e-6, atol=1e-6)
    for name, g, g_ref in zip(names, auto[1], ref32[1]):
        assert (g - g_ref).norm() <= 2e-2 * g_ref.norm() + 1e-6, name
    low = mhc.to(dtype)
    out, grads = _run(low, h.to(dtype), False)
    out_ref, grads_ref = _run(low, h.to(dtype), True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert (out.float() - out_ref.float()).norm() <= 2 * u * out_ref.float().norm()
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert (g.float() - g_ref.float()).norm() <= 8 * u * g_ref.float().norm() + 1e-6, name


def test_width_connection_saves_only_the_streams(saved_bytes):
    """Per token it keeps H once (n*d in bf16 under autocast) plus O(n^2) numbers; plain autograd
    keeps H in fp32 twice, the (n+1)*d mix and more."""
    B, T, n, d = 2, 64, 4, 256
    mhc = ManifoldHyperConnection(d, n, branch_index=0)
    h = torch.randn(B, T, n, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = saved_bytes(lambda: mhc.width_connection(h))
        naive = saved_bytes(lambda: mhc.width_connection_reference(h))
    per_token = (fused - sum(p.numel() * p.element_size() for p in mhc.parameters())) / (B * T)
    assert per_token <= n * d * 2 + 64 * (n * n + 2 * n) * 4, per_token
    assert fused < naive / 3, (fused, naive)


def test_backward_twice_through_a_retained_graph(kernels):
    """The node keeps the per-token map's graph instead of re-running it in backward: a second
    backward through a retained graph must find it intact and give the same gradients."""
    mhc = _random_mhc(4, 16, "sinkhorn", "residual")
    h = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    x, ctx = mhc.width_connection(h)
    loss = mhc.depth_connection(ctx, torch.tanh(x)).square().sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in (h, mhc.phi, mhc.bias_res, mhc.gate_pre)]
    loss.backward()
    for g, p in zip(first, (h, mhc.phi, mhc.bias_res, mhc.gate_pre)):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_backward_over_chunks_of_tokens_and_rebuilt_streams(kernels, monkeypatch, autocast):
    """Backward widens (or rebuilds) the flat streams a chunk of tokens at a time: with chunks of
    3 over 10 tokens (3 + 3 + 3 + 1), two chained connections (the second rebuilds its streams)
    match plain autograd."""
    from hyperbit.pathways import _mhc_fused

    monkeypatch.setattr(_mhc_fused, "_CHUNK", 3)
    first, second = _random_mhc(4, 12, "sinkhorn", "residual", dtype=torch.float32, seed=1), \
        _random_mhc(4, 12, "sinkhorn", "residual", dtype=torch.float32, seed=2)
    h0 = torch.randn(2, 5, 4, 12)
    leaves = [*first.parameters(), *second.parameters()]

    def grads(reference):
        h = h_in = h0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for mhc in (first, second):
                width = mhc.width_connection_reference if reference else mhc.width_connection
                x, ctx = width(h)
                h = mhc.depth_connection(ctx, torch.tanh(x).roll(1, -1))
        return torch.autograd.grad(h.square().sum(), [h_in, *leaves], allow_unused=True)

    tol = 2e-2 if autocast else 1e-5
    for g, g_ref in zip(grads(False), grads(True)):
        if g_ref is not None:
            assert (g - g_ref).norm() <= tol * g_ref.norm() + 1e-6

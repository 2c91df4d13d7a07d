"""The memory-lean width connection equals the plain-autograd reference, and stays lean."""

from __future__ import annotations

import pytest
import torch

from hyperbit.pathways import HyperConnection


def _random_hc(n, d, dynamic, use_tanh, branch_norm, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    hc = HyperConnection(d, n, branch_index=1, dynamic=dynamic, use_tanh=use_tanh,
                         branch_norm=branch_norm).to(dtype)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return hc


def _run(hc, h, y_weight, reference):
    h = h.clone().requires_grad_(True)
    width = hc.width_connection_reference if reference else hc.width_connection
    depth = hc.depth_connection_reference if reference else hc.depth_connection
    x, ctx = width(h)
    y = torch.tanh(x @ y_weight) if y_weight is not None else torch.tanh(x).roll(1, -1)
    out = depth(ctx, y)  # a non-linear stand-in branch
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum()
    grads = torch.autograd.grad(loss, [h] + list(hc.parameters()))
    return out, grads


@pytest.mark.parametrize("dynamic,use_tanh", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("branch_norm", [True, False])
# n = 4: the kernels' compile-time-n path; 17: above HC_MAX_N, the PyTorch path. d = 44: whole
# vectors of the kernels and a tail
@pytest.mark.parametrize("n", [1, 2, 3, 4, 17])
def test_fused_matches_reference_values_and_gradients(n, dynamic, use_tanh, branch_norm, kernels):
    d = 44
    hc = _random_hc(n, d, dynamic, use_tanh, branch_norm)
    h = torch.randn(2, 5, n, d, dtype=torch.float64)
    w = torch.randn(d, d, dtype=torch.float64) / d**0.5
    out, grads = _run(hc, h, w, reference=False)
    out_ref, grads_ref = _run(hc, h, w, reference=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    names = ["h"] + [k for k, _ in hc.named_parameters()]
    assert len(grads) == len(grads_ref) == len(names)
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=name)


def test_fused_under_autocast_is_close_to_fp32(kernels):
    """Under bf16 autocast only the saved copy of H is bf16: values exact, gradients close."""
    d, n = 32, 4
    hc = _random_hc(n, d, True, True, True, dtype=torch.float32)
    h = torch.randn(2, 8, n, d)
    out, grads = _run(hc, h, None, reference=False)  # elementwise branch: no autocast effect
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, grads_ac = _run(hc, h, None, reference=False)
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, out, rtol=1e-6, atol=1e-6)
    for g, g_ac in zip(grads, grads_ac):
        assert (g_ac - g).norm() <= 2e-2 * g.norm() + 1e-6


@pytest.mark.parametrize("dynamic", [False, True])
def test_width_connection_saves_only_the_streams(dynamic, saved_bytes):
    """Per token it keeps H (n*d in bf16 under autocast) plus O(n^2) scalars, not the n*d
    normed copy and the (n+1)*d product a naive implementation keeps alive."""
    B, T, n, d = 2, 64, 4, 256
    hc = HyperConnection(d, n, branch_index=0, dynamic=dynamic)
    params = {p.untyped_storage().data_ptr() for p in hc.parameters()}
    h = torch.randn(B, T, n, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = saved_bytes(lambda: hc.width_connection(h))
    naive = saved_bytes(lambda: hc.width_connection_reference(h))
    per_token_fused = (fused - sum(p.numel() * 4 for p in hc.parameters())) / (B * T)
    assert per_token_fused <= n * d * 2 + 64 * (n + 2) * 4, per_token_fused
    assert fused < naive / 2
    del params

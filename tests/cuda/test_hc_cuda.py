"""Hyper-connections on a GPU: the memory-lean fused autograd nodes against the plain-autograd
reference (``width_connection_reference`` / ``depth_connection_reference``) in fp32 and under
bf16 autocast, and both against a float64 CPU ground truth."""

from __future__ import annotations

import pytest
import torch

from hyperbit.pathways import HyperConnection

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = "cuda"


def _hc(n: int, d: int, dynamic: bool, branch_norm: bool = True) -> HyperConnection:
    torch.manual_seed(0)
    hc = HyperConnection(d, n, branch_index=1, dynamic=dynamic, branch_norm=branch_norm)
    with torch.no_grad():  # away from the Pre-Norm init: every weight matters
        for p in hc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return hc


def _run(hc, h, w, reference: bool, autocast: bool):
    """Forward + backward through width -> a linear branch -> depth; returns out and the gradients
    of h and every parameter, all as float64 on the CPU."""
    h = h.clone().requires_grad_(True)
    width = hc.width_connection_reference if reference else hc.width_connection
    depth = hc.depth_connection_reference if reference else hc.depth_connection
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        x, ctx = width(h)
        y = torch.tanh(x @ w)  # (B, T, d): a bf16 matmul under autocast
        out = depth(ctx, y)
    weight = torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=torch.float64)
    loss = (out.double() * weight).pow(2).sum()
    grads = torch.autograd.grad(loss, [h, *hc.parameters()])
    return out.detach().double().cpu(), [g.double().cpu() for g in grads]


def _inputs(n: int, d: int, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 16, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return h.to(device, dtype), w.to(device, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


CASES = [(n, dynamic) for n in (1, 2, 4) for dynamic in (False, True)]


@pytest.mark.parametrize("n,dynamic", CASES)
def test_fused_matches_reference_in_fp32(n, dynamic):
    d = 64
    hc = _hc(n, d, dynamic).to(DEVICE)
    h, w = _inputs(n, d, DEVICE)
    out, grads = _run(hc, h, w, reference=False, autocast=False)
    out_ref, grads_ref = _run(hc, h, w, reference=True, autocast=False)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,dynamic", CASES)
def test_fused_matches_reference_under_bf16_autocast(n, dynamic):
    """Under autocast both compute the connection in fp32; the branch's matmul is bf16 and the
    fused node keeps its copy of H in bf16, so gradients agree to bf16 precision. Both stay
    within bf16 precision of the float64 CPU computation."""
    d = 64
    hc = _hc(n, d, dynamic).to(DEVICE)
    h, w = _inputs(n, d, DEVICE)
    out, grads = _run(hc, h, w, reference=False, autocast=True)
    out_ref, grads_ref = _run(hc, h, w, reference=True, autocast=True)
    assert out.shape == (2, 16, n, d)
    assert _rel(out, out_ref) < 1e-3
    for g, g_ref in zip(grads, grads_ref):
        assert _rel(g, g_ref) < 1e-2
    truth_hc = _hc(n, d, dynamic).double()
    h64, w64 = _inputs(n, d, "cpu", torch.float64)
    out64, grads64 = _run(truth_hc, h64, w64, reference=True, autocast=False)
    assert _rel(out, out64) < 1e-2
    for g, g64 in zip(grads, grads64):
        assert _rel(g, g64) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streams_keep_their_dtype_and_parameters_get_gradients_in_theirs(dtype):
    d, n = 64, 4
    hc = _hc(n, d, True).to(DEVICE, dtype)
    h, w = _inputs(n, d, DEVICE, dtype)
    h.requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x, ctx = hc.width_connection(h)
        out = hc.depth_connection(ctx, torch.tanh(x @ w))
    assert x.dtype == dtype and out.dtype == dtype
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in hc.parameters())

"""RMSNorm: forward and backward against an fp64 reference and against ``F.rms_norm``, the
numerics contract (fp32 statistics, output in the input's dtype, nothing downcast under
autocast), what it saves for backward, and bit-for-bit agreement with ``rms_backward`` (the
formula the fused hyper-connection kernels use)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hyperbit.nn.norm import RMSNorm, rms_backward, rms_norm, rms_rstd


def reference(x, w, eps):
    xd = x.double()
    y = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    return y * w.double() if w is not None else y


def data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    gy = torch.randn(shape, generator=g).to(dtype)
    return x, w, gy


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6),
                                       (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_forward_and_backward_match_the_fp64_reference(dtype, tol, affine):
    x, w, gy = data((3, 5, 64), dtype)
    w = w if affine else None
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == dtype
    ref = reference(x, w, 1e-6)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * scale)
    inputs = [x, w] if affine else [x]
    got = torch.autograd.grad(y, inputs, gy)
    want = torch.autograd.grad(ref, inputs, gy.double())
    for name, a, b in zip(["x", "w"], got, want):
        assert a.dtype == dtype, name
        b = b.double()  # (the reference's gradient arrives in the input's dtype)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


def test_gradcheck_fp64():
    x, w, _ = data((4, 16), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-3), (x, w))
    assert torch.autograd.gradcheck(lambda a: rms_norm(a, None, 1e-3), (x,))


@pytest.mark.parametrize("shape", [(8 * 32, 32), (2, 8, 96)])
def test_equals_torch_rms_norm(shape):
    x, w, gy = data(shape, torch.float32, seed=1)
    y = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        y.weight.copy_(w)
    out = y(x)
    ref = F.rms_norm(x, (shape[-1],), w, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    gx, gw = torch.autograd.grad(out, [x, y.weight], gy)
    rx, rw = torch.autograd.grad(ref, [x, w], gy)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_under_autocast_an_fp32_input_stays_fp32_end_to_end():
    x, w, gy = data((4, 32), torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        y = rms_norm(x, w, 1e-6)
        gx, gw = torch.autograd.grad(y, [x, w], gy)  # backward under autocast too
    assert y.dtype == gx.dtype == gw.dtype == torch.float32
    ref = reference(x, w, 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())
    rx, rw = torch.autograd.grad(ref, [x, w], gy.double())
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_saves_only_the_input_and_one_scalar_per_row():
    x, w, _ = data((6, 128), torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    full = [t for t in saved if t.numel() == x.numel()]
    assert len(full) == 1 and full[0].dtype == torch.bfloat16  # the input, not an fp32 copy
    rest = [t for t in saved if t.numel() != x.numel()]
    assert sorted(t.numel() for t in rest) == [6, 128]  # rstd (per row) and the weight


def test_backward_is_bit_for_bit_the_shared_formula():
    """The fused hyper-connection kernels compute the branch norm's gradient as
    ``rms_backward(g * w, x * rstd, rstd)`` and its weight gradient as ``sum(g * x * rstd)``;
    the module must do the same arithmetic (a one-stream hyper-connection equals Pre-Norm)."""
    x, w, gy = data((2, 7, 48), torch.float32, seed=3)
    gx, gw = torch.autograd.grad(rms_norm(x, w, 1e-6), [x, w], gy)
    rstd = rms_rstd(x.detach(), 1e-6)
    xhat = x.detach() * rstd
    assert torch.equal(gx, rms_backward(gy * w.detach(), xhat, rstd))
    assert torch.equal(gw, (gy * xhat).reshape(-1, 48).sum(0))
    # and rms_backward is the textbook expression, to round-off
    g = torch.randn(5, 48, dtype=torch.float64)
    xh, r = torch.randn(5, 48, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64)
    torch.testing.assert_close(rms_backward(g, xh, r), r * (g - xh * (g * xh).mean(-1, keepdim=True)))

"""The CPU kernels of ``hyperbit/nn/native.c`` against their PyTorch references, and the fallback
when they cannot be built."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn import native
from hyperbit.pathways import sinkhorn as sk

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the PyTorch path runs")


def _logits(N, n, dtype, seed=0):
    """Mild, wide (Sinkhorn far from converged) and floored (a row spread beyond LOGIT_RANGE)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(N, n, n, generator=g, dtype=dtype),
                      4 * torch.randn(N, n, n, generator=g, dtype=dtype),
                      30 * torch.randn(N, n, n, generator=g, dtype=dtype)])


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_kernel_matches_the_reference(n, iters, dtype, tol):
    z = _logits(37, n, dtype)  # 111 tokens: blocks of 16 and a partial one
    out = native.sinkhorn(z, iters, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)
    torch.testing.assert_close(out, sk._sinkhorn_reference(z, iters), rtol=0, atol=tol)


@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_sinkhorn_kernel_backward_matches_autograd_fp64(n, iters):
    """Through the rounds and the rounding step, unconverged (few rounds, wide logits) included,
    and exactly zero for floored logits, as autograd's clamp gives."""
    z = _logits(37, n, torch.float64, seed=1).requires_grad_(True)
    g = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (ref,) = torch.autograd.grad(sk._sinkhorn_reference(z, iters), z, g)
    out = native.sinkhorn_backward(z.detach(), g, iters, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    floored = z - z.amax(-1, keepdim=True) < -sk.LOGIT_RANGE
    assert (out[floored] == 0).all()


@needs_native
@pytest.mark.parametrize("n", [2, 4])
def test_sinkhorn_kernel_fp32_backward_follows_fp64_autograd(n):
    """The fp32 kernel (the one training runs) against autograd in fp64 on the same logits."""
    z = _logits(37, n, torch.float32, seed=3)[:74]  # mild and wide logits (the floor is fp64's test)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    z64 = z.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(sk._sinkhorn_reference(z64, 20), z64, g.double())
    out = native.sinkhorn_backward(z, g, 20, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=2e-4)


@needs_native
def test_sinkhorn_kernels_give_the_same_bits_at_any_thread_count(same_bits_at_any_thread_count):
    """Blocks of tokens are split among threads; no token's result may depend on that split."""
    z = _logits(100, 4, torch.float32, seed=5)  # 300 tokens: 19 blocks, the last one partial
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    same_bits_at_any_thread_count(lambda: (native.sinkhorn(z, 20, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR),
                                           native.sinkhorn_backward(z, g, 20, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)),
                                  counts=(1, 2, 3))


@needs_native
def test_sinkhorn_kernel_extreme_logits_are_finite():
    signs = torch.randn(200, 4, 4, generator=torch.Generator().manual_seed(0)).sign()
    z = torch.cat([1e4 * signs, torch.full((1, 4, 4), -1e4), torch.full((1, 4, 4), 1e4)])
    out = native.sinkhorn(z, 20, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)
    grad = native.sinkhorn_backward(z, torch.randn_like(z), 20, sk.LOGIT_RANGE, sk._DEFICIT_FLOOR)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(z.shape[:-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(-2), torch.ones(z.shape[:-1]), rtol=0, atol=1e-5)


def test_the_pytorch_path_runs_when_the_kernels_are_off(monkeypatch):
    """HYPERBIT_NATIVE=0: the recomputing autograd node, with the same values and gradients."""
    z = _logits(5, 4, torch.float64).requires_grad_(True)
    g = torch.randn(z.shape, dtype=torch.float64)
    on = sk.sinkhorn(z, 5)
    (g_on,) = torch.autograd.grad(on, z, g)
    monkeypatch.setenv("HYPERBIT_NATIVE", "0")
    assert native.library() is None and not native.takes(z)
    off = sk.sinkhorn(z, 5)
    (g_off,) = torch.autograd.grad(off, z, g)
    torch.testing.assert_close(off, on, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_off, g_on, rtol=1e-9, atol=1e-11)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("HYPERBIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="CPU kernels unavailable"):
        assert native.library() is None
    assert native.library() is None  # remembered: no second attempt, no second warning
    assert list(tmp_path.iterdir()) == []  # no partial library left behind
    z = torch.randn(3, 4, 4, requires_grad=True)
    sk.sinkhorn(z).sum().backward()
    assert torch.isfinite(z.grad).all()


@needs_native
def test_the_library_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    """Built once into the cache, under its key, then reused; another source or another included
    file, another key. The "compiler" here copies the library this session built (a real build of
    this source has run once already: the cache key is a hash of the sources), and counts its
    calls."""
    calls, cache = tmp_path / "calls", tmp_path / "cache"
    compiler = tmp_path / "cc"
    compiler.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                        f'cp "{native.library()._name}" "$out" && echo built >> "{calls}"\n')
    compiler.chmod(0o755)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("HYPERBIT_CACHE", str(cache))
    monkeypatch.setenv("CC", str(compiler))
    assert native.library() is not None
    (built,) = cache.iterdir()  # no temporary file left beside it
    assert built.name.startswith("hyperbit_native_") and built.suffix == ".so"
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert calls.read_text().split() == ["built"]  # reused, not rebuilt
    monkeypatch.setattr(native, "SOURCE", tmp_path / "native.c")  # another source: another key
    native.SOURCE.write_bytes(native.Path(native.__file__).with_name("native.c").read_bytes() + b"\n")
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert calls.read_text().split() == ["built", "built"] and len(list(cache.iterdir())) == 2
    # an included file that changes (here one next to the source, read instead of the package's)
    (tmp_path / "native_mhc.c").write_bytes(native.Path(native.__file__).with_name("native_mhc.c").read_bytes() + b"\n")
    assert native.source_files()[1] == tmp_path / "native_mhc.c"
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert calls.read_text().split() == ["built"] * 3 and len(list(cache.iterdir())) == 3


@needs_native
def test_the_sinkhorn_operator_passes_opcheck():
    """The custom op that puts the kernel inside ``torch.compile`` graphs: schema, fake (meta)
    kernel, autograd registration, on contiguous and on transposed (strided) logits."""
    z = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(sk._sinkhorn_op, (z, 5))
    torch.library.opcheck(sk._sinkhorn_op, (z.transpose(0, 1), 5))
    torch.library.opcheck(sk._sinkhorn_backward_op, (z.detach(), torch.randn_like(z), 5))


# ---------------------------------------------------------------------------------------------
# hyper-connection mixing (the PyTorch path of pathways/_hc_fused.py is the reference)
# ---------------------------------------------------------------------------------------------
def _hc_inputs(n, d, dtype, per_token, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 7, n, d, generator=g, dtype=dtype)
    alpha = torch.randn(*((3, 7) if per_token else ()), n, n + 1, generator=g, dtype=dtype)
    return h, alpha


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("n,d", [(1, 8), (3, 37), (4, 64)])
def test_hc_mixing_kernels_match_pytorch(n, d, per_token, dtype, tol):
    from hyperbit.pathways._hc_fused import mix_backward, mix_forward

    h, alpha = _hc_inputs(n, d, dtype, per_token)
    x, mixed, saved, rstd = native.hc_forward(h, alpha, save_bf16=dtype == torch.float32)
    assert rstd is None
    x_ref, mixed_ref, _ = mix_forward(h, alpha, None, 0.0)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=tol)
    torch.testing.assert_close(mixed, mixed_ref, rtol=0, atol=tol)
    if saved is not None:  # the bf16 copy is torch's rounding, bit for bit
        assert torch.equal(saved, h.to(torch.bfloat16))
        torch.testing.assert_close(native.hc_branch_input(saved, alpha, dtype),
                                   mix_forward(saved.to(dtype), alpha, None, 0.0)[0], rtol=0, atol=tol)
    g = torch.Generator().manual_seed(1)
    g_x, g_mixed = torch.randn(x.shape, generator=g, dtype=dtype), torch.randn(mixed.shape, generator=g, dtype=dtype)
    for gm in (g_mixed, None):
        g_h, g_alpha, g_wt, g_w = native.hc_backward(h, alpha, g_x, gm, None, None, None, None, None, 0.0, 0.0, False)
        assert g_w is None
        g_h_ref, g_alpha_ref, _ = mix_backward(h, alpha, None, None, g_x, gm, False)
        assert g_wt is None
        torch.testing.assert_close(g_h, g_h_ref, rtol=0, atol=10 * tol)
        torch.testing.assert_close(g_alpha, g_alpha_ref, rtol=0, atol=100 * tol)


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("use_tanh", [True, False])
@pytest.mark.parametrize("n,d", [(1, 8), (3, 37), (4, 64)])
def test_dynamic_forward_kernel_matches_pytorch(n, d, use_tanh, dtype, tol):
    """DHC's weights and mixing in one pass against the PyTorch formulas of the same node."""
    from hyperbit.nn.norm import rms_rstd
    from hyperbit.pathways._hc_fused import mix_forward

    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 7, n, d, generator=g, dtype=dtype)
    static_alpha, static_beta = torch.randn(n, n + 1, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    wt = torch.randn(n + 2, d, generator=g, dtype=dtype) / d**0.5
    s_alpha, s_beta, eps = 0.3, -0.2, 1e-6
    (x, mixed, saved, _), (alpha, beta, r, p, t) = native.hc_forward_dynamic(
        h, static_alpha, static_beta, wt, s_alpha, s_beta, eps, use_tanh, save_bf16=dtype == torch.float32)
    r_ref = rms_rstd(h, eps)
    p_ref = h @ wt.T
    t_ref = (p_ref * r_ref).tanh() if use_tanh else p_ref * r_ref
    alpha_ref = t_ref[..., : n + 1] * s_alpha + static_alpha
    for got, want in ((r, r_ref), (p, p_ref), (t, t_ref), (alpha, alpha_ref),
                      (beta, t_ref[..., n + 1] * s_beta + static_beta)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    x_ref, mixed_ref, _ = mix_forward(h, alpha_ref, None, 0.0)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=10 * tol)
    torch.testing.assert_close(mixed, mixed_ref, rtol=0, atol=10 * tol)
    assert (saved is None) == (dtype == torch.float64)
    if saved is not None:
        assert torch.equal(saved, h.to(torch.bfloat16))


@needs_native
def test_the_float_tanh_is_within_two_ulp_everywhere():
    """The fp32 kernel's own tanh (inline, branch-free) over magnitudes from 1e-30 to 1e3, both
    signs and zero, against float64 tanh rounded to float32; NaN stays NaN. The arguments go in as
    the projection weights, with streams of ones (d = 1, eps = 0: r = 1, so t = tanh(wt))."""
    mags = torch.cat([torch.logspace(-30, 3, 12000), torch.linspace(0.5, 1.0, 3000),
                      torch.tensor([0.0, 0.625, 9.0, 20.0])])
    z = torch.cat([mags, -mags, torch.tensor([float("nan")])])
    n = native.HC_MAX_N
    got = torch.cat([native.hc_forward_dynamic(torch.ones(1, 1, n, 1), torch.zeros(n, n + 1), torch.zeros(n),
                                               chunk.unsqueeze(-1), 1.0, 1.0, 0.0, True, False)[1][4][0, 0, 0, :len(chunk)]
                     for chunk in torch.nn.functional.pad(z, (0, -len(z) % (n + 2))).split(n + 2)])[:len(z)]
    want = torch.tanh(z.double()).float()
    assert got[-1].isnan() and not got[:-1].isnan().any()
    got, want = got[:-1], want[:-1]
    ulp = (torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()).double()
    err = (got.double() - want.double()).abs() / ulp
    assert err.max() <= 2.0, (float(err.max()), float(z[err.argmax()]))
    assert torch.equal(got[want == 0], want[want == 0])


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("need_gain_grad", [True, False])
@pytest.mark.parametrize("n,d", [(3, 37), (4, 64)])
def test_the_branch_norm_in_the_kernels_matches_pytorch(n, d, per_token, need_gain_grad, dtype, tol):
    """Forward: the normed branch input and its rstd; backward: dL/dH, dL/dalpha and dL/d(gain)
    with the norm's backward run per token inside the kernel, against the PyTorch norm around the
    same kernels."""
    from hyperbit.pathways._hc_fused import _norm_backward, branch_norm

    h, alpha = _hc_inputs(n, d, dtype, per_token)
    g = torch.Generator().manual_seed(3)
    norm_w = 1 + 0.3 * torch.randn(d, generator=g, dtype=dtype)
    out, mixed, _, rstd = native.hc_forward(h, alpha, False, norm_w, 1e-5)
    x, mixed_ref, _, _ = native.hc_forward(h, alpha, False)
    out_ref, rstd_ref = branch_norm(x, norm_w, 1e-5)
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(rstd, rstd_ref, rtol=tol, atol=0)
    assert torch.equal(mixed, mixed_ref)
    g_out = torch.randn(out.shape, generator=g, dtype=dtype)
    g_mixed = torch.randn(mixed.shape, generator=g, dtype=dtype)
    g_h, g_alpha, _, g_w = native.hc_backward(h, alpha, g_out, g_mixed, None, None, None, None, None,
                                              0.0, 0.0, False, norm=(rstd, norm_w, need_gain_grad))
    g_x, g_w_ref = _norm_backward(x, rstd_ref, norm_w, g_out, True)
    g_h_ref, g_alpha_ref, _, _ = native.hc_backward(h, alpha, g_x, g_mixed, None, None, None, None, None, 0.0, 0.0, False)
    torch.testing.assert_close(g_h, g_h_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g_alpha, g_alpha_ref, rtol=tol, atol=10 * tol)
    if need_gain_grad:
        torch.testing.assert_close(g_w, g_w_ref, rtol=tol, atol=10 * tol)
    else:
        assert g_w is None


@needs_native
def test_parameter_gradients_are_the_same_bits_at_any_thread_count(same_bits_at_any_thread_count):
    """dL/dWt and dL/d(norm gain) are sums over tokens of partial sums over fixed blocks of
    tokens, added in block order: repeated calls, and calls with 1, 2, 3 or 4 threads, give the
    same bits (a run resumed with another thread count reproduces the uninterrupted one)."""
    n, d = 4, 64
    h, alpha = _hc_inputs(n, d, torch.float32, True)
    h, alpha = h.repeat(40, 1, 1, 1), alpha.repeat(40, 1, 1, 1)
    g = torch.Generator().manual_seed(5)
    wt = torch.randn(n + 2, d, generator=g)
    t, p = torch.randn(*h.shape[:-1], n + 2, generator=g).tanh(), torch.randn(*h.shape[:-1], n + 2, generator=g)
    r = torch.rand(*h.shape[:-1], 1, generator=g) + 0.5
    g_out, g_mixed = torch.randn(*h.shape[:-2], d, generator=g), torch.randn(h.shape, generator=g)
    g_beta = torch.randn(*h.shape[:-1], generator=g)
    norm = (torch.rand(*h.shape[:-2], 1, generator=g) + 0.5, torch.randn(d, generator=g), True)
    same_bits_at_any_thread_count(
        lambda: native.hc_backward(h, alpha, g_out, g_mixed, g_beta, t, r, p, wt, 0.1, 0.2, True, norm=norm),
        counts=(4, 4, 1, 2, 3))


@needs_native
def test_the_bf16_copy_rounds_like_torch_ties_and_specials_included():
    bits = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7FFFFF,
                         0x7F800000, 0xFF800000, 0x00000001, 0x80000000, 0x3F800000, 0x4049_0FDB],
                        dtype=torch.int64).to(torch.int32)  # ties to even/odd, max, inf, denormal
    h = bits.view(torch.float32).reshape(1, 1, 3, 4)
    _, _, saved, _ = native.hc_forward(h, torch.eye(3, 4), save_bf16=True)
    assert torch.equal(saved.view(torch.int16), h.to(torch.bfloat16).view(torch.int16))
    nan = torch.full((1, 1, 1, 4), float("nan"))
    assert native.hc_forward(nan, torch.eye(1, 2), save_bf16=True)[2].isnan().all()


@needs_native
@pytest.mark.parametrize("per_token", [False, True])
# bf16 branch outputs meet fp32 streams (autocast); fp64 streams get fp64 outputs
@pytest.mark.parametrize("dtype,tol,y_bf16", [(torch.float64, 1e-13, False), (torch.float32, 1e-5, False),
                                              (torch.float32, 1e-5, True)])
def test_depth_kernels_match_pytorch(per_token, y_bf16, dtype, tol):
    g = torch.Generator().manual_seed(0)
    n, d = 3, 37
    mixed = torch.randn(2, 5, n, d, generator=g, dtype=dtype)
    beta = torch.randn(*((2, 5) if per_token else ()), n, generator=g, dtype=dtype)
    y = torch.randn(2, 5, d, generator=g, dtype=dtype)
    y = y.to(torch.bfloat16) if y_bf16 else y
    yc = y.to(dtype)
    out = native.depth_forward(mixed, beta, y)
    torch.testing.assert_close(out, mixed + beta.unsqueeze(-1) * yc.unsqueeze(-2), rtol=0, atol=tol)
    grad = torch.randn(mixed.shape, generator=g, dtype=dtype)
    g_y, g_beta = native.depth_backward(grad, beta, y, True, True)
    torch.testing.assert_close(g_y, (beta.unsqueeze(-1) * grad).sum(-2), rtol=0, atol=tol)
    torch.testing.assert_close(g_beta, (grad * yc.unsqueeze(-2)).sum(-1), rtol=0, atol=10 * tol)
    assert native.depth_backward(grad, beta, y, False, True)[0] is None
    assert native.depth_backward(grad, beta, y, True, False)[1] is None


@needs_native
def test_every_kernel_has_its_signature_declared():
    """ctypes passes undeclared arguments as C ints: a 64-bit size or a double would be garbage
    (or a crash). Every entry point of native.c gets its argument types."""
    import re

    lib = native.library()
    text = "".join(path.read_text() for path in native.source_files())
    names = re.findall(r"^int (hb_\w+)_##SUF\(", text, flags=re.M)
    assert len(names) >= 6
    for name in names:
        for suffix in ("f32", "f64"):
            assert getattr(lib, f"{name}_{suffix}").argtypes is not None, name


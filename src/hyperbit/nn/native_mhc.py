"""Python entry points of mHC's own CPU kernels in ``native.c`` (``pathways/_mhc_fused.py``): the
width forward and backward in one pass each, and for res="permutations" the projection and the
backward's two passes; on the library and helpers of :mod:`.native`."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .native import _check, _fn, _hc_backward, _threads
from .native_args import _depth, _norm_backward, _norm_forward, _ptr, _streams


def hc_alpha_backward(h: Tensor | None, alpha: Tensor, g_out: Tensor, g_mixed: Tensor | None,
                      norm: tuple[Tensor, Tensor, bool], source: tuple[Tensor, ...] | None = None,
                      round_bf16: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The first half of mHC's width backward in two passes (the second: :func:`mhc_backward`; both
    in one: :func:`mhc_backward_fused`): dL/dalpha per token, dL/dx of the branch input before its
    norm (B, T, d) and dL/d(norm gain), as :func:`.native.hc_backward` computes them, without
    writing dL/dH."""
    _, g_alpha, _, g_w, g_xn = _hc_backward(h, alpha, g_out, g_mixed, None, None, None, None, None, 0.0, 0.0,
                                            False, source, round_bf16, norm, None, False)
    return g_alpha, g_xn, g_w


def mhc_backward_fused(h: Tensor | None, alpha: Tensor, g_out: Tensor, g_mixed: Tensor | None,
                       norm: tuple[Tensor, Tensor, bool], z: Tensor, r: Tensor, logits: Tensor, post: Tensor,
                       g_post: Tensor | None, a: Tensor, iters: int, logit_range: float, deficit_floor: float,
                       phi: Tensor, source: tuple[Tensor, ...] | None = None, round_bf16: bool = False,
                       depth: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """mHC's whole width backward in one pass over the streams (``h`` or ``source``, as for
    :func:`.native.hc_backward`), the projection and the map of :func:`mhc_forward` (``z``, ``r``,
    ``logits``, ``alpha``, ``post`` as it wrote them, the gates ``a``) reversed per block of
    tokens: dL/dH (B, T, n, d), dL/dphi, the gradients of [b_pre | b_post | b_res | a_pre |
    a_post | a_res] and of the norm's gain (``norm = (x_rstd, norm_w, need)``, else None).
    ``g_out``: dL/d(the normed branch input); ``depth``: as for :func:`.native.hc_backward`."""
    compute = phi.dtype
    st, hold, lead, n, d = _streams(h, source, round_bf16)
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    nm, g_w, _ = _norm_backward(norm, g_out, False, hold)
    alpha, g_mixed, z, r, logits, post, g_post, a, phi = (c(t) for t in (alpha, g_mixed, z, r, logits, post,
                                                                          g_post, a, phi))
    g_h = torch.empty(*lead, n, d, dtype=compute)
    g_phi, g_par = torch.empty_like(phi), phi.new_empty(phi.shape[0] + 3)
    dp = _depth(depth, hold)
    _check(_fn("hb_mhc_backward_fused", compute)(
        ctypes.byref(st), g_out[..., 0].numel(), n, d, alpha.data_ptr(), _ptr(g_mixed), nm, z.data_ptr(),
        r.data_ptr(), logits.data_ptr(), post.data_ptr(), _ptr(g_post), a.data_ptr(), iters, logit_range,
        deficit_floor, phi.data_ptr(), phi.shape[0], g_h.data_ptr(), g_phi.data_ptr(), g_par.data_ptr(), dp,
        _threads()), "mhc_backward_fused")
    del hold
    return g_h, g_phi, g_par, g_w


def mhc_forward(h: Tensor, phi: Tensor, eps: float, b: Tensor, a: Tensor, iters: int, logit_range: float,
                deficit_floor: float, save_bf16: bool, norm_w: Tensor | None, norm_eps: float, mixed: bool
                ) -> tuple[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None], tuple[Tensor, ...]]:
    """mHC's width forward in one pass over the streams ``h`` (B, T, n, d), per block of tokens:
    :func:`mhc_project`, the per-token map with res from Sinkhorn (``pathways.manifold``: ``b`` =
    [b_pre | b_post | b_res], ``a`` = [a_pre, a_post, a_res]) and the mixing of
    :func:`.native.hc_forward`. Returns ``(x, mixed, saved, x_rstd)`` as :func:`.native.hc_forward`
    and ``(z, r, logits, alpha, post)``: the projection and its rstd, the res logits (B, T, n, n)
    kept for backward, alpha = [pre | res^T] (B, T, n, n+1) and post (B, T, n)."""
    lead, (n, d) = h.shape[:-2], h.shape[-2:]
    h, phi, b, a = h.contiguous(), phi.contiguous(), b.contiguous(), a.contiguous()
    m = phi.shape[0]
    z, r, logits = h.new_empty(*lead, m), h.new_empty(*lead, 1), h.new_empty(*lead, n, n)
    alpha, post = h.new_empty(*lead, n, n + 1), h.new_empty(*lead, n)
    x, mix = h.new_empty(*lead, d), h.new_empty(*lead, n, d) if mixed else None
    saved = torch.empty(h.shape, dtype=torch.bfloat16) if save_bf16 else None
    nm, rstd, hold = _norm_forward(norm_w, norm_eps, x)
    _check(_fn("hb_mhc_forward", h.dtype)(
        h.data_ptr(), x[..., 0].numel(), n, d, phi.data_ptr(), m, eps, b.data_ptr(), a.data_ptr(), iters,
        logit_range, deficit_floor, z.data_ptr(), r.data_ptr(), logits.data_ptr(), alpha.data_ptr(),
        post.data_ptr(), x.data_ptr(), _ptr(mix), _ptr(saved), nm, _threads()), "mhc_forward")
    del hold
    return (x, mix, saved, rstd), (z, r, logits, alpha, post)


def mhc_project(x: Tensor, phi: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """mHC's projection of the flat streams ``x`` (B, T, K): ``z = (x phi^T) r`` (B, T, m) and
    ``r = rsqrt(mean(x^2) + eps)`` (B, T, 1), in one pass over ``x`` (``phi`` (m, K), same dtype)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x, phi = x.contiguous(), phi.contiguous()
    z, r = x.new_empty(*lead, phi.shape[0]), x.new_empty(*lead, 1)
    _check(_fn("hb_mhc_project", x.dtype)(x.data_ptr(), x[..., 0].numel(), K, phi.data_ptr(), phi.shape[0], eps,
                                          z.data_ptr(), r.data_ptr(), _threads()), "mhc_project")
    return z, r


def mhc_backward(h: Tensor | None, alpha: Tensor, g_xn: Tensor, g_mixed: Tensor | None, g_p: Tensor,
                 coef: Tensor, phi: Tensor, source: tuple[Tensor, ...] | None = None, round_bf16: bool = False,
                 depth: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The second half of mHC's width backward, one pass over the streams (``h`` or ``source``, as
    for :func:`.native.hc_backward`): dL/dH (B, T, n, d), through the mixing (per-token ``alpha``, the
    branch input's dL/dx ``g_xn`` from :func:`hc_alpha_backward`, dL/d mixed ``g_mixed`` or None)
    and through the projection ``z = (x phi^T) r`` of the flat streams x (``g_p`` = dL/dz r
    (B, T, m), ``coef`` = sum_k dL/dz_k z_k r^2 / (n d) (B, T)), and dL/dphi (m, n d). ``depth``:
    as for :func:`.native.hc_backward`. All in the dtype of ``phi``."""
    compute = phi.dtype
    st, hold, lead, n, d = _streams(h, source, round_bf16)
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    alpha, g_xn, g_mixed, g_p, coef, phi = c(alpha), c(g_xn), c(g_mixed), c(g_p), c(coef), c(phi)
    g_h = torch.empty(*lead, n, d, dtype=compute)
    g_phi = torch.empty_like(phi)
    dp = _depth(depth, hold)
    _check(_fn("hb_mhc_backward", compute)(
        ctypes.byref(st), g_xn[..., 0].numel(), n, d, alpha.data_ptr(), g_xn.data_ptr(), _ptr(g_mixed),
        g_p.data_ptr(), coef.data_ptr(), phi.data_ptr(), phi.shape[0], g_h.data_ptr(), g_phi.data_ptr(),
        dp, _threads()), "mhc_backward")
    del hold
    return g_h, g_phi

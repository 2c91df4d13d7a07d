"""The CPU kernels' arguments as ``native.c`` takes them (:mod:`.native`, :mod:`.native_mhc`): the
``hb_norm``, ``hb_streams`` and ``hb_depth`` structures, and the packing of tensors into them
(contiguous copies are held in a list until the call returns: a temporary's memory could be
reused while C still reads it)."""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Norm(ctypes.Structure):
    """``hb_norm`` of native.c: the branch norm the kernels apply (forward) or differentiate."""

    _fields_ = [("w", ctypes.c_void_p), ("g_out", ctypes.c_void_p), ("rstd", ctypes.c_void_p),
                ("g_w", ctypes.c_void_p), ("g_x", ctypes.c_void_p), ("eps", ctypes.c_double)]


def _norm_forward(norm_w: Tensor | None, eps: float, x: Tensor) -> tuple[Any, Tensor | None, list[Tensor]]:
    """The ``hb_norm`` pointer for a forward kernel writing the branch input ``x``, the per-token
    rstd it fills, and the tensors to hold until the call returns."""
    if norm_w is None:
        return None, None, []
    w = norm_w.contiguous()
    rstd = x.new_empty(*x.shape[:-1], 1)
    return ctypes.byref(_Norm(w=w.data_ptr(), rstd=rstd.data_ptr(), eps=eps)), rstd, [w]


def _norm_backward(norm: tuple[Tensor, Tensor, bool] | None, g_out: Tensor, want_g_x: bool, hold: list[Tensor]
                   ) -> tuple[Any, Tensor | None, Tensor | None]:
    """The ``hb_norm`` pointer for a backward kernel given ``norm = (x_rstd, norm_w, need_gain_grad)``
    (or None) and dL/d(normed branch input) ``g_out`` (B, T, d), with the gain's gradient and, if
    ``want_g_x``, the norm's dL/dx per token that it fills; the tensors it reads go into ``hold``."""
    if norm is None:
        return None, None, None
    x_rstd, norm_w, need_g_w = norm
    x_rstd, norm_w, g_out = x_rstd.contiguous(), norm_w.contiguous(), g_out.contiguous()
    g_w = g_out.new_empty(g_out.shape[-1]) if need_g_w else None
    g_x = torch.empty_like(g_out) if want_g_x else None
    hold += [x_rstd, norm_w, g_out]
    return ctypes.byref(_Norm(w=norm_w.data_ptr(), g_out=g_out.data_ptr(), rstd=x_rstd.data_ptr(), g_w=_ptr(g_w),
                              g_x=_ptr(g_x))), g_w, g_x


class _Streams(ctypes.Structure):
    """``hb_streams`` of native.c: the streams a backward kernel reads, given (``h``) or rebuilt."""

    _fields_ = [("h", ctypes.c_void_p), ("prev", ctypes.c_void_p), ("alpha", ctypes.c_void_p),
                ("beta", ctypes.c_void_p), ("y", ctypes.c_void_p), ("h_bf16", ctypes.c_int),
                ("prev_bf16", ctypes.c_int), ("alpha_per_token", ctypes.c_int),
                ("beta_per_token", ctypes.c_int), ("y_bf16", ctypes.c_int), ("round_bf16", ctypes.c_int)]


def _streams(h: Tensor | None, source: tuple[Tensor, ...] | None, round_bf16: bool
             ) -> tuple[_Streams, list[Tensor], tuple[int, ...], int, int]:
    """The kernels' view of the streams: ``h`` (B, T, n, d), or ``source`` = (prev, alpha, beta, y)
    that rebuild them (see ``pathways._hc_fused.rebuild_streams``). Returns the structure, the
    contiguous tensors it points into (hold them until the call returns), and lead dims, n, d."""
    bf16 = lambda t: int(t.dtype == torch.bfloat16)  # noqa: E731
    if h is not None:
        h = h.contiguous()
        return _Streams(h=h.data_ptr(), h_bf16=bf16(h)), [h], h.shape[:-2], h.shape[-2], h.shape[-1]
    prev, alpha, beta, y = (t.contiguous() for t in source)
    st = _Streams(prev=prev.data_ptr(), alpha=alpha.data_ptr(), beta=beta.data_ptr(), y=y.data_ptr(),
                  prev_bf16=bf16(prev), alpha_per_token=int(alpha.dim() > 2),
                  beta_per_token=int(beta.dim() > 1), y_bf16=bf16(y), round_bf16=int(round_bf16))
    return st, [prev, alpha, beta, y], prev.shape[:-2], prev.shape[-2], prev.shape[-1]


class _Depth(ctypes.Structure):
    """``hb_depth`` of native.c: the depth connection before, whose backward runs on dL/dH."""

    _fields_ = [("beta", ctypes.c_void_p), ("y", ctypes.c_void_p), ("g_y", ctypes.c_void_p),
                ("g_beta", ctypes.c_void_p), ("beta_per_token", ctypes.c_int), ("y_bf16", ctypes.c_int)]


def _depth(depth: tuple[Tensor, Tensor, Tensor, Tensor] | None, hold: list[Tensor]):
    """The ``hb_depth`` pointer for ``depth = (beta, y, g_y, g_beta)``, or None; the tensors it
    points into are added to ``hold``."""
    if depth is None:
        return None
    d_beta, d_y, d_g_y, d_g_beta = depth
    d_beta, d_y = d_beta.contiguous(), d_y.contiguous()
    hold += [d_beta, d_y]
    return ctypes.byref(_Depth(beta=d_beta.data_ptr(), y=d_y.data_ptr(), g_y=d_g_y.data_ptr(),
                               g_beta=d_g_beta.data_ptr(), beta_per_token=int(d_beta.dim() > 1),
                               y_bf16=int(d_y.dtype == torch.bfloat16)))

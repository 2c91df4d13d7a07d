"""The hyper-connection kernels of :mod:`.native` (and mHC's of :mod:`.native_mhc`) as
:mod:`torch.library` operators, so that they also run inside ``torch.compile``d blocks.

A ``ctypes`` call cannot be traced, so a compiled block used to run the PyTorch path of the width
and depth connections (the reference arithmetic, which Inductor fuses less well than the kernels
fuse it by hand). Registered as operators with a fake (shape-only) implementation, the kernels are
opaque nodes in the block's graph: the compiler fuses and schedules what is around them, and
calls them as they are. The autograd nodes of ``pathways._hc_fused`` and ``pathways._mhc_fused``
call the functions below in both modes: outside ``torch.compile`` they call the kernels directly (no
dispatcher on the eager path); while compiling, the operators.

An operator cannot return None: a result that a call does not produce (the bf16 copy, the norm's
rstd, a gradient nobody asked for) comes back as an empty tensor from the operator and as None
from these functions, as from :mod:`.native`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import native, native_mhc

_NONE = (0,)  # the shape of an absent result


def _opt(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_NONE) if t is None else t


def _none(t: Tensor) -> Tensor | None:
    return None if t.shape == _NONE else t


def _f(s: Tensor | float | None) -> float:
    return 0.0 if s is None else float(s)


# -- the operators (real and fake implementations) -----------------------------------------------

@torch.library.custom_op("hyperbit::hc_forward", mutates_args=())
def _hc_forward_op(h: Tensor, alpha: Tensor, save_bf16: bool, norm_w: Optional[Tensor],
                   norm_eps: float, mixed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, mixed_, saved, rstd = native.hc_forward(h, alpha, save_bf16, norm_w, norm_eps, mixed)
    return x, _opt(mixed_, h), _opt(saved, h), _opt(rstd, h)


@_hc_forward_op.register_fake
def _hc_forward_fake(h, alpha, save_bf16, norm_w, norm_eps, mixed):
    lead, (n, d) = h.shape[:-2], h.shape[-2:]
    return (h.new_empty(*lead, d), h.new_empty(*lead, n, d) if mixed else h.new_empty(_NONE),
            h.new_empty(h.shape, dtype=torch.bfloat16) if save_bf16 else h.new_empty(_NONE),
            h.new_empty(*lead, 1) if norm_w is not None else h.new_empty(_NONE))


@torch.library.custom_op("hyperbit::hc_forward_dynamic", mutates_args=())
def _hc_forward_dynamic_op(h: Tensor, static_alpha: Tensor, static_beta: Tensor, wt: Tensor,
                           s_alpha: Tensor, s_beta: Tensor, eps: float, use_tanh: bool, save_bf16: bool,
                           norm_w: Optional[Tensor], norm_eps: float, mixed: bool) -> list[Tensor]:
    (x, mixed_, saved, rstd), weights = native.hc_forward_dynamic(
        h, static_alpha, static_beta, wt, _f(s_alpha), _f(s_beta), eps, use_tanh, save_bf16, norm_w, norm_eps,
        mixed)
    return [x, _opt(mixed_, h), _opt(saved, h), _opt(rstd, h), *weights]


@_hc_forward_dynamic_op.register_fake
def _(h, static_alpha, static_beta, wt, s_alpha, s_beta, eps, use_tanh, save_bf16, norm_w, norm_eps, mixed):
    lead, n = h.shape[:-2], h.shape[-2]
    return [*_hc_forward_fake(h, static_alpha, save_bf16, norm_w, norm_eps, mixed),
            h.new_empty(*lead, n, n + 1), h.new_empty(*lead, n), h.new_empty(*lead, n, 1),
            h.new_empty(*lead, n, n + 2), h.new_empty(*lead, n, n + 2)]


# The backward kernels read the streams ``h`` as given, or (``h`` None) rebuild them per token
# from ``source = (prev, alpha, beta, y)`` (``native.hc_rebuild``): both forms are one operator,
# with the streams as ``h`` or as the four source tensors.

def _source(prev: Tensor | None, *rest: Tensor | None) -> tuple[Tensor, ...] | None:
    return None if prev is None else (prev, *rest)


def _streams_shape(h: Tensor | None, prev: Tensor | None) -> torch.Size:
    return (h if h is not None else prev).shape


@torch.library.custom_op("hyperbit::hc_backward", mutates_args=())
def _hc_backward_op(h: Optional[Tensor], prev: Optional[Tensor], src_alpha: Optional[Tensor],
                    src_beta: Optional[Tensor], y: Optional[Tensor], alpha: Tensor, g_x: Tensor,
                    g_mixed: Optional[Tensor], g_beta: Optional[Tensor], t: Optional[Tensor],
                    r: Optional[Tensor], p: Optional[Tensor], wt: Optional[Tensor],
                    s_alpha: Optional[Tensor], s_beta: Optional[Tensor], use_tanh: bool, round_bf16: bool,
                    x_rstd: Optional[Tensor], norm_w: Optional[Tensor], need_norm_grad: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    norm = None if norm_w is None else (x_rstd, norm_w, need_norm_grad)
    g_h, g_alpha, g_wt, g_w = native.hc_backward(
        h, alpha, g_x, g_mixed, g_beta, t, r, p, wt, _f(s_alpha), _f(s_beta), use_tanh,
        _source(prev, src_alpha, src_beta, y), round_bf16, norm)
    return g_h, g_alpha, _opt(g_wt, g_x), _opt(g_w, g_x)


@_hc_backward_op.register_fake
def _(h, prev, src_alpha, src_beta, y, alpha, g_x, g_mixed, g_beta, t, r, p, wt, s_alpha, s_beta,
      use_tanh, round_bf16, x_rstd, norm_w, need_norm_grad):
    shape = _streams_shape(h, prev)
    lead, (n, d) = shape[:-2], shape[-2:]
    return (g_x.new_empty(*lead, n, d), g_x.new_empty(*lead, n, n + 1),
            g_x.new_empty(n + 2, d) if wt is not None else g_x.new_empty(_NONE),
            g_x.new_empty(d) if norm_w is not None and need_norm_grad else g_x.new_empty(_NONE))


@torch.library.custom_op("hyperbit::hc_branch_input", mutates_args=())
def _hc_branch_input_op(h: Optional[Tensor], prev: Optional[Tensor], src_alpha: Optional[Tensor],
                        src_beta: Optional[Tensor], y: Optional[Tensor], alpha: Tensor,
                        compute: torch.dtype, round_bf16: bool) -> Tensor:
    return native.hc_branch_input(h, alpha, compute, _source(prev, src_alpha, src_beta, y), round_bf16)


@_hc_branch_input_op.register_fake
def _(h, prev, src_alpha, src_beta, y, alpha, compute, round_bf16):
    shape = _streams_shape(h, prev)
    return alpha.new_empty(*shape[:-2], shape[-1], dtype=compute)


@torch.library.custom_op("hyperbit::hc_rebuild", mutates_args=())
def _hc_rebuild_op(prev: Tensor, alpha: Tensor, beta: Tensor, y: Tensor, compute: torch.dtype,
                   round_bf16: bool) -> Tensor:
    return native.hc_rebuild(prev, alpha, beta, y, compute, round_bf16)


@_hc_rebuild_op.register_fake
def _(prev, alpha, beta, y, compute, round_bf16):
    return prev.new_empty(prev.shape, dtype=compute)


@torch.library.custom_op("hyperbit::depth_forward", mutates_args=())
def _depth_forward_op(mixed: Tensor, beta: Tensor, y: Tensor) -> Tensor:
    return native.depth_forward(mixed, beta, y)


@_depth_forward_op.register_fake
def _(mixed, beta, y):
    return torch.empty_like(mixed, memory_format=torch.contiguous_format)


@torch.library.custom_op("hyperbit::depth_backward", mutates_args=())
def _depth_backward_op(g: Tensor, beta: Tensor, y: Tensor, need_y: bool, need_beta: bool
                       ) -> tuple[Tensor, Tensor]:
    g_y, g_beta = native.depth_backward(g, beta, y, need_y, need_beta)
    return _opt(g_y, g), _opt(g_beta, g)


@_depth_backward_op.register_fake
def _(g, beta, y, need_y, need_beta):
    lead, (n, d) = g.shape[:-2], g.shape[-2:]
    return (g.new_empty(*lead, d) if need_y else g.new_empty(_NONE),
            g.new_empty(*lead, n) if need_beta else g.new_empty(_NONE))


@torch.library.custom_op("hyperbit::mhc_forward", mutates_args=())
def _mhc_forward_op(h: Tensor, phi: Tensor, eps: float, b: Tensor, a: Tensor, iters: int, logit_range: float,
                    deficit_floor: float, save_bf16: bool, norm_w: Optional[Tensor], norm_eps: float,
                    mixed: bool) -> list[Tensor]:
    (x, mixed_, saved, rstd), kept = native_mhc.mhc_forward(h, phi, eps, b, a, iters, logit_range, deficit_floor,
                                                            save_bf16, norm_w, norm_eps, mixed)
    return [x, _opt(mixed_, h), _opt(saved, h), _opt(rstd, h), *kept]


@_mhc_forward_op.register_fake
def _(h, phi, eps, b, a, iters, logit_range, deficit_floor, save_bf16, norm_w, norm_eps, mixed):
    lead, n = h.shape[:-2], h.shape[-2]
    return [*_hc_forward_fake(h, None, save_bf16, norm_w, norm_eps, mixed), h.new_empty(*lead, phi.shape[0]),
            h.new_empty(*lead, 1), h.new_empty(*lead, n, n), h.new_empty(*lead, n, n + 1), h.new_empty(*lead, n)]


@torch.library.custom_op("hyperbit::mhc_backward", mutates_args=())
def _mhc_backward_op(h: Optional[Tensor], prev: Optional[Tensor], src_alpha: Optional[Tensor],
                     src_beta: Optional[Tensor], y: Optional[Tensor], alpha: Tensor, g_out: Tensor,
                     g_mixed: Optional[Tensor], x_rstd: Tensor, norm_w: Tensor, need_norm_grad: bool, z: Tensor,
                     r: Tensor, logits: Tensor, post: Tensor, g_post: Optional[Tensor], a: Tensor, iters: int,
                     logit_range: float, deficit_floor: float, phi: Tensor, round_bf16: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g_h, g_phi, g_par, g_w = native_mhc.mhc_backward_fused(
        h, alpha, g_out, g_mixed, (x_rstd, norm_w, need_norm_grad), z, r, logits, post, g_post, a, iters,
        logit_range, deficit_floor, phi, _source(prev, src_alpha, src_beta, y), round_bf16)
    return g_h, g_phi, g_par, _opt(g_w, g_out)


@_mhc_backward_op.register_fake
def _(h, prev, src_alpha, src_beta, y, alpha, g_out, g_mixed, x_rstd, norm_w, need_norm_grad, z, r, logits,
      post, g_post, a, iters, logit_range, deficit_floor, phi, round_bf16):
    shape = _streams_shape(h, prev)
    return (phi.new_empty(shape), torch.empty_like(phi), phi.new_empty(phi.shape[0] + 3),
            g_out.new_empty(g_out.shape[-1]) if need_norm_grad else g_out.new_empty(_NONE))


# -- what the autograd nodes call ----------------------------------------------------------------

def hc_forward(h: Tensor, alpha: Tensor, save_bf16: bool, norm_w: Tensor | None = None,
               norm_eps: float = 0.0, mixed: bool = True
               ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`.native.hc_forward`, also inside ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return native.hc_forward(h, alpha, save_bf16, norm_w, norm_eps, mixed)
    x, mixed_, saved, rstd = _hc_forward_op(h, alpha, save_bf16, norm_w, norm_eps, mixed)
    return x, _none(mixed_), _none(saved), _none(rstd)


def hc_forward_dynamic(h: Tensor, static_alpha: Tensor, static_beta: Tensor, wt: Tensor,
                       s_alpha: Tensor, s_beta: Tensor, eps: float, use_tanh: bool, save_bf16: bool,
                       norm_w: Tensor | None = None, norm_eps: float = 0.0, mixed: bool = True):
    """:func:`.native.hc_forward_dynamic`, also inside ``torch.compile`` (the gains as tensors)."""
    if not torch.compiler.is_compiling():
        return native.hc_forward_dynamic(h, static_alpha, static_beta, wt, float(s_alpha), float(s_beta),
                                         eps, use_tanh, save_bf16, norm_w, norm_eps, mixed)
    x, mixed_, saved, rstd, *weights = _hc_forward_dynamic_op(
        h, static_alpha, static_beta, wt, s_alpha, s_beta, eps, use_tanh, save_bf16, norm_w, norm_eps, mixed)
    return (x, _none(mixed_), _none(saved), _none(rstd)), tuple(weights)


def hc_backward(h: Tensor | None, alpha: Tensor, g_x: Tensor, g_mixed: Tensor | None,
                g_beta: Tensor | None, t: Tensor | None, r: Tensor | None, p: Tensor | None,
                wt: Tensor | None, s_alpha: Tensor | None, s_beta: Tensor | None, use_tanh: bool,
                source: tuple[Tensor, ...] | None = None, round_bf16: bool = False,
                norm: tuple[Tensor, Tensor, bool] | None = None,
                depth: tuple[Tensor, ...] | None = None):
    """:func:`.native.hc_backward`, also inside ``torch.compile`` (there with the streams as
    given, ``source`` None; the gains as tensors or None; no ``depth``, which fills its outputs in
    place)."""
    if not torch.compiler.is_compiling():
        return native.hc_backward(h, alpha, g_x, g_mixed, g_beta, t, r, p, wt, _f(s_alpha), _f(s_beta),
                                  use_tanh, source, round_bf16, norm, depth)
    assert depth is None, "the depth connection's fused backward runs eager only"
    x_rstd, norm_w, need = norm if norm is not None else (None, None, False)
    g_h, g_alpha, g_wt, g_w = _hc_backward_op(h, *(source or (None,) * 4), alpha, g_x, g_mixed, g_beta, t,
                                              r, p, wt, s_alpha, s_beta, use_tanh, round_bf16, x_rstd,
                                              norm_w, need)
    return g_h, g_alpha, _none(g_wt), _none(g_w)


def hc_branch_input(h: Tensor | None, alpha: Tensor, compute: torch.dtype,
                    source: tuple[Tensor, ...] | None = None, round_bf16: bool = False) -> Tensor:
    """:func:`.native.hc_branch_input`, also inside ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return native.hc_branch_input(h, alpha, compute, source, round_bf16)
    return _hc_branch_input_op(h, *(source or (None,) * 4), alpha, compute, round_bf16)


def hc_rebuild(prev: Tensor, alpha: Tensor, beta: Tensor, y: Tensor, compute: torch.dtype,
               round_bf16: bool = False) -> Tensor:
    """:func:`.native.hc_rebuild`, also inside ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return native.hc_rebuild(prev, alpha, beta, y, compute, round_bf16)
    return _hc_rebuild_op(prev, alpha, beta, y, compute, round_bf16)


def depth_forward(mixed: Tensor, beta: Tensor, y: Tensor) -> Tensor:
    """:func:`.native.depth_forward`, also inside ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return native.depth_forward(mixed, beta, y)
    return _depth_forward_op(mixed, beta, y)


def depth_backward(g: Tensor, beta: Tensor, y: Tensor, need_y: bool, need_beta: bool
                   ) -> tuple[Tensor | None, Tensor | None]:
    """:func:`.native.depth_backward`, also inside ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return native.depth_backward(g, beta, y, need_y, need_beta)
    g_y, g_beta = _depth_backward_op(g, beta, y, need_y, need_beta)
    return _none(g_y), _none(g_beta)


def mhc_forward(h: Tensor, phi: Tensor, eps: float, b: Tensor, a: Tensor, iters: int, logit_range: float,
                deficit_floor: float, save_bf16: bool, norm_w: Tensor | None, norm_eps: float, mixed: bool
                ) -> tuple[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None], tuple[Tensor, ...]]:
    """:func:`.native_mhc.mhc_forward`, also inside ``torch.compile``."""
    args = (h, phi, eps, b, a, iters, logit_range, deficit_floor, save_bf16, norm_w, norm_eps, mixed)
    if not torch.compiler.is_compiling():
        return native_mhc.mhc_forward(*args)
    x, mixed_, saved, rstd, *kept = _mhc_forward_op(*args)
    return (x, _none(mixed_), _none(saved), _none(rstd)), tuple(kept)


def mhc_backward_fused(h: Tensor | None, alpha: Tensor, g_out: Tensor, g_mixed: Tensor | None,
                       norm: tuple[Tensor, Tensor, bool], z: Tensor, r: Tensor, logits: Tensor, post: Tensor,
                       g_post: Tensor | None, a: Tensor, iters: int, logit_range: float, deficit_floor: float,
                       phi: Tensor, source: tuple[Tensor, ...] | None = None, round_bf16: bool = False,
                       depth: tuple[Tensor, ...] | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`.native_mhc.mhc_backward_fused`, also inside ``torch.compile`` (there without
    ``depth``, as :func:`hc_backward`)."""
    if not torch.compiler.is_compiling():
        return native_mhc.mhc_backward_fused(h, alpha, g_out, g_mixed, norm, z, r, logits, post, g_post, a, iters,
                                             logit_range, deficit_floor, phi, source, round_bf16, depth)
    assert depth is None, "the depth connection's fused backward runs eager only"
    g_h, g_phi, g_par, g_w = _mhc_backward_op(h, *(source or (None,) * 4), alpha, g_out, g_mixed, *norm, z, r,
                                              logits, post, g_post, a, iters, logit_range, deficit_floor, phi,
                                              round_bf16)
    return g_h, g_phi, g_par, _none(g_w)

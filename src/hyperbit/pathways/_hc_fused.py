"""Memory-lean, bandwidth-lean hyper-connection kernels in plain PyTorch.

A naive hyper-connection keeps, per branch, the streams ``H`` (n x d), their norm (n x d) and the
whole ``alpha^T H`` product ((n+1) x d) alive for backward: ~3x the activation memory of Pre-Norm
at n = 4, and its backward makes many full-size temporaries. The width node here (and the depth
nodes of ``_depth_fused``) keep ``H`` once (in its own dtype, or the autocast dtype when autocast is on, as every linear layer keeps its
input) plus per-token scalars, and recompute the rest. They compute in the dtype of the weights
they are given (fp32, or fp64) and return the branch input and the new streams in the dtype of
``H``: bf16 / fp16 streams are widened on the way in and rounded once on the way out. Every value
and gradient is checked against the plain autograd reference
(:meth:`HyperConnection.width_connection_reference`) in the tests.

Shapes: ``H`` (B, T, n, d); static alpha (n, n+1), beta (n,); dynamic weights ``Wt`` (n+2, d),
the transpose of ``[W_alpha | W_beta]``; gains s_alpha, s_beta (1,); branch-norm weight (d,).

The dynamic weights use ``P = H W`` (raw) and the stream norm's ``r = rsqrt(mean(H^2) + eps)``:
``z = P * r`` equals ``norm(H) W`` without materialising ``norm(H)``. Backward, with
``g_z = dL/dz``: ``dL/dH = (g_z r) Wt - H r^3/d * sum_k g_z[k] P[k]`` and ``dL/dWt = (g_z r)^T H``.

Every other branch keeps no copy of ``H`` at all: when ``H`` is what the previous connection's
depth node returned, ``H = A_r^T H_prev + beta y`` is determined by tensors the previous width and
depth nodes keep for their own backward (their saved streams and alpha, beta and the branch
output ``y``), and :func:`rebuild_streams` recomputes it in backward (``hyper._offer_rebuild``).

Skinny matrix products are written with the long dimension last (``Wt @ H^T`` rather than
``H @ W``): on CPU that is 3-7x faster for n + 2 columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn import native, native_ops
from ..nn.norm import rms_backward, rms_rstd




def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` batched over the leading (B, T) dims of ``b``; ``a`` may be unbatched (static
    weights). ``torch.matmul`` would fold an unbatched ``a`` into one skinny mm plus a transposing
    copy; and a transposed ``a`` with a size-1 dim has strides that send CPU bmm down a path 100x
    slower. ``a`` is O(n^2) per token, so it is simply made contiguous."""
    lead, k = b.shape[:-2], a.shape[-1]
    if k <= 2:  # contraction over 1 or 2 streams: multiply-adds beat bmm's per-matrix overhead
        out = a[..., :, :1] * b[..., None, 0, :]
        if k == 2:
            out = out.addcmul_(a[..., :, 1:], b[..., None, 1, :])
        return out
    a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:]).contiguous()
    # a broadcast b (the n copies of expand_streams, or the gradient of reduce_streams) sends CPU
    # bmm down a per-matrix loop: copy it; a transposed b is fine as it is (bmm reads it in place).
    # Compiled, Inductor picks the layouts (and a stride test inside autocast breaks the graph).
    b3 = b.reshape(-1, *b.shape[-2:])
    if not torch.compiler.is_compiling() and 0 in b3.stride():
        b3 = b3.contiguous()
    return torch.bmm(a3, b3).view(*lead, a.shape[-2], b.shape[-1])


def _project(h: Tensor, wt: Tensor) -> Tensor:
    """``h @ wt.T`` for h (..., d) and a skinny wt (k, d), computed as ``(wt @ h^T)^T``."""
    return (wt @ h.reshape(-1, h.shape[-1]).T).T.reshape(*h.shape[:-1], wt.shape[0])


def branch_norm(x: Tensor, norm_w: Tensor | None, norm_eps: float) -> tuple[Tensor, Tensor | None]:
    """The branch input ``x * rstd(x) * norm_w`` and its per-token rstd (``norm_w`` None: ``x`` as
    it is, no rstd): the arithmetic of the Pre-Norm RMSNorm, so a one-stream HC matches it bit for
    bit."""
    if norm_w is None:
        return x, None
    x_rstd = rms_rstd(x, norm_eps)
    return x * x_rstd * norm_w, x_rstd


def mix_forward(h: Tensor, alpha: Tensor, norm_w: Tensor | None, norm_eps: float
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``alpha^T H`` for ``h`` (B, T, n, d) and ``alpha`` (n, n+1) or (B, T, n, n+1), both in the
    compute dtype: the branch input ``A_m^T H``, RMS-normed with gain ``norm_w`` if given, the
    mixed streams ``A_r^T H`` (B, T, n, d), and the norm's per-token rstd (None without a norm)."""
    mix = _bmm(alpha.transpose(-1, -2), h)  # alpha^T H: (B, T, n+1, d)
    x, mixed = mix[..., 0, :], mix[..., 1:, :]  # A_m^T H (branch input), A_r^T H
    out, x_rstd = branch_norm(x, norm_w, norm_eps)
    return out, mixed, x_rstd


def _norm_backward(x: Tensor, x_rstd: Tensor | None, norm_w: Tensor | None, g_out: Tensor,
                   need_norm_w: bool) -> tuple[Tensor, Tensor | None]:
    """dL/dx and dL/dnorm_w of ``out = x * x_rstd * norm_w`` (``norm_w`` None: no norm)."""
    if norm_w is None:
        return g_out, None
    xhat = x * x_rstd
    g_norm_w = (g_out * xhat).reshape(-1, x.shape[-1]).sum(0) if need_norm_w else None
    return rms_backward(g_out * norm_w, xhat, x_rstd), g_norm_w


def mix_backward(h: Tensor, alpha: Tensor, norm_w: Tensor | None, x_rstd: Tensor | None,
                 g_out: Tensor, g_mixed: Tensor | None, need_norm_w: bool
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The reverse of :func:`mix_forward` given the gradients of its branch input and mixed
    streams (``g_mixed`` None: unused): ``dL/dH`` (B, T, n, d), ``dL/dalpha`` per token
    (B, T, n, n+1), and ``dL/dnorm_w`` when ``need_norm_w``. The branch input is recomputed from
    ``h``; everything is in the dtype of ``h`` (the compute dtype)."""
    x = _bmm(alpha[..., :, 0].unsqueeze(-2), h).squeeze(-2) if norm_w is not None else None  # A_m^T H
    g_x, g_norm_w = _norm_backward(x, x_rstd, norm_w, g_out.to(h.dtype), need_norm_w)
    g_mixed = torch.zeros_like(h) if g_mixed is None else g_mixed.to(h.dtype)
    g_mix = torch.cat([g_x.unsqueeze(-2), g_mixed], dim=-2)  # (B, T, n+1, d)
    g_h = _bmm(alpha, g_mix)  # (B, T, n, d)
    g_alpha_tok = _bmm(h, g_mix.transpose(-1, -2))  # (B, T, n, n+1), per token
    return g_h, g_alpha_tok, g_norm_w


def kernel_dtypes(compute: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes the C kernels read for a computation in ``compute`` (fp32 or fp64): ``compute``
    itself and, for fp32, bf16 (the autocast copies of the streams, branch outputs under autocast)."""
    return (compute, torch.bfloat16) if compute == torch.float32 else (compute,)


def _kernels_rebuild(source: tuple[Tensor, ...], compute: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the C kernels can rebuild streams of ``dtype`` from ``source`` (CPU is implied by
    the caller's ``_native_ok``): prev, y and the streams in :func:`kernel_dtypes`."""
    takes = kernel_dtypes(compute)
    return source[0].dtype in takes and source[3].dtype in takes and dtype in takes


def rebuild_streams(prev: Tensor, alpha: Tensor, beta: Tensor, y: Tensor, compute: torch.dtype,
                    dtype: torch.dtype, use_native: bool) -> Tensor:
    """The streams ``H' = A_r^T prev + beta y`` that a depth connection returned (in ``dtype``),
    rebuilt in ``compute`` from what the nodes that made them keep for their own backward: the
    width connection's saved streams ``prev`` and ``alpha``, the depth connection's ``beta`` and
    branch output ``y``. With the forward's arithmetic, so bit for bit the streams given when
    ``prev`` is the full-precision copy (no autocast); under autocast ``prev`` is the bf16 copy,
    and the rebuilt streams carry the same bf16 round-off a bf16 copy of ``H'`` would. (The HC
    backward kernels rebuild each token's streams themselves, from the same ``source``.)"""
    if use_native and _kernels_rebuild((prev, alpha, beta, y), compute, dtype):
        return native_ops.hc_rebuild(prev, alpha, beta, y, compute, round_bf16=dtype != compute)
    mixed = mix_forward(prev.to(compute).contiguous(), alpha, None, 0.0)[1]
    out = torch.addcmul(mixed, beta.unsqueeze(-1), y.to(compute).unsqueeze(-2))
    return out if dtype == compute else out.to(dtype).to(compute)


def backward_streams(saved: Tensor | None, source: list[Tensor], compute: torch.dtype,
                     dtype: torch.dtype, use_native: bool) -> tuple[Tensor | None, tuple[Tensor, ...] | None]:
    """What a width node's backward reads its streams from: ``(saved, None)`` when it kept a copy;
    else ``(None, source)`` when the C kernels rebuild them per token, or the streams rebuilt by
    PyTorch ops (:func:`rebuild_streams`) and None."""
    if saved is not None:
        return saved, None
    if use_native and _kernels_rebuild(source, compute, dtype):
        return None, tuple(source)
    return rebuild_streams(*source, compute, dtype, use_native=False), None


def kernel_mix_backward(h: Tensor | None, src: tuple[Tensor, ...] | None, alpha: Tensor, g_out: Tensor,
                        g_mixed: Tensor | None, norm_w: Tensor | None, x_rstd: Tensor | None,
                        kernel_norm: bool, need_norm_w: bool, round_bf16: bool, dynamic: tuple = (),
                        depth: tuple[Tensor, ...] | None = None
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The C-kernel reverse of the mixing (and of the branch norm: inside the kernel when
    ``kernel_norm``, else PyTorch's around it), with streams from :func:`backward_streams`:
    dL/dH, dL/dalpha per token, dL/dWt (``dynamic`` = (g_beta, t, r, p, wt, s_alpha, s_beta,
    use_tanh) for DHC) and dL/d(norm gain), in the dtype of ``alpha``; ``depth``: the depth
    backward before, see ``native.hc_backward``."""
    compute = alpha.dtype
    g_x, norm, g_norm_w = g_out.to(compute), None, None
    if kernel_norm:
        norm = (x_rstd, norm_w, need_norm_w)
    elif norm_w is not None:
        x = native_ops.hc_branch_input(h, alpha, compute, src, round_bf16)
        g_x, g_norm_w = _norm_backward(x, x_rstd, norm_w, g_x, need_norm_w)
    g_beta, t, r, p, wt, s_alpha, s_beta, use_tanh = dynamic or (None,) * 7 + (False,)
    g_h, g_alpha, g_wt, g_kernel_norm_w = native_ops.hc_backward(
        h, alpha, g_x, None if g_mixed is None else g_mixed.to(compute),
        None if g_beta is None else g_beta.to(compute), t, r, p, wt, s_alpha, s_beta, use_tanh,
        src, round_bf16, norm, depth)
    return g_h, g_alpha, g_wt, g_kernel_norm_w if kernel_norm else g_norm_w


def kept_outputs(ctx, saved: Tensor | None, alpha: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A width node's saved streams and alpha as two more (non-differentiable) results, for the
    next node's rebuild source and for a depth node that mixes (``_depth_fused.DepthFromStreams``); None
    for one that equals an input of the node (the streams kept in their own dtype, static alpha),
    which the caller fills in (:func:`kept_for_rebuild`). Results, not a side channel: inside
    ``torch.compile`` only a node's results may leave its subgraph."""
    ctx.mark_non_differentiable(*(t for t in (saved, alpha) if t is not None))
    return saved, alpha


def kept_for_rebuild(saved: Tensor | None, alpha: Tensor | None, streams: Tensor,
                     static_alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (saved streams, alpha) of the next node's rebuild source, from :func:`kept_outputs`
    with the node's inputs filled back in."""
    return (streams.detach() if saved is None else saved,
            static_alpha.detach() if alpha is None else alpha)


def placeholder(h: Tensor) -> Tensor:
    """A width node's ``mixed`` result when its depth node mixes the streams itself: the shape of
    ``H`` and no memory (a zero-stride view of one zero), through which the depth node hands
    ``dL/d(A_r^T H)`` back to the width node's backward."""
    return h.new_zeros(()).expand(h.shape)


def mixes_in_depth(h: Tensor, compute: torch.dtype, save_dtype: torch.dtype) -> bool:
    """Whether the width node leaves the mixing ``A_r^T H`` to the depth node (C kernels, streams
    in the compute dtype): then the width kernel writes no n*d ``mixed`` tensor, and the depth
    kernel reads ``H`` in its place (one n*d write and its read less per branch)."""
    return h.dtype == compute and _native_ok(h, compute, save_dtype)


def _native_ok(h: Tensor, compute: torch.dtype, save_dtype: torch.dtype) -> bool:
    """The C kernels (``nn/native.c``) take this connection: CPU, n small, and the saved copy of H
    in the compute dtype or (for fp32) bf16; inside ``torch.compile`` as operators
    (``nn/native_ops.py``)."""
    return h.shape[-2] <= native.HC_MAX_N and save_dtype in kernel_dtypes(compute) and native.takes(h)


class WidthConnection(torch.autograd.Function):
    """The width connection in one node. On CPU DHC's dynamic weights, the mixing and the branch
    norm (forward), and the norm, the mixing and the chain through the dynamic weights (backward),
    run in the C kernels of ``nn/native.c``: one pass over a token's streams forward, one backward.
    Elsewhere the PyTorch ops below, the reference arithmetic. With one stream the branch norm is
    PyTorch's (Pre-Norm's arithmetic), so a one-stream HC stays Pre-Norm bit for bit (at init the
    dynamic part is exactly zero on either path)."""

    @staticmethod
    def forward(ctx, h, static_alpha, static_beta, dyn_wt, s_alpha, s_beta, norm_w,
                stream_eps, norm_eps, use_tanh, save_dtype, source=None, keep=False, lazy=False,
                saved_copy=None, depth_grad=None):
        # the weights come in the compute dtype (fp32, or fp64); h in the streams' dtype.
        # source: (prev, alpha, beta, y) that rebuild h (see rebuild_streams): h is not kept.
        # keep: also return (saved h, alpha) when h is kept, for the next node's source.
        # lazy: mixes_in_depth holds; mixed is a placeholder, and alpha is returned.
        # saved_copy: the copy of h in the save dtype an earlier node made and keeps (mHC's
        # projection): kept instead of a copy of this node's own. Static alpha and beta may also
        # be per token (mHC's), their gradients then per token too. depth_grad: the offer of the
        # depth node whose output h is (_depth_fused.DepthGradOffer), taken with the kernels.
        ctx.h_dtype, streams = h.dtype, h
        compute = static_alpha.dtype
        h = h.to(compute).contiguous()  # expand_streams' broadcast view would slow bmm
        n = h.shape[-2]
        ctx.native = _native_ok(h, compute, save_dtype)
        ctx.depth_grad = depth_grad if ctx.native and ctx.h_dtype == compute else None
        # the branch norm runs in the kernels too, except with one stream: PyTorch's, so that a
        # one-stream HC stays Pre-Norm bit for bit
        ctx.kernel_norm = ctx.native and norm_w is not None and n >= 2
        if ctx.native:  # the dynamic weights, the mixing and the bf16 copy of H: one pass per token
            save_bf16 = (save_dtype != compute and streams.dtype != save_dtype and saved_copy is None
                         and source is None)  # (a node that rebuilds its streams keeps no copy)
            kn = norm_w if ctx.kernel_norm else None
            if dyn_wt is not None:
                (x, mixed, saved, x_rstd), (alpha, beta, r, p, t) = native_ops.hc_forward_dynamic(
                    h, static_alpha, static_beta, dyn_wt, s_alpha, s_beta, stream_eps,
                    use_tanh, save_bf16, kn, norm_eps, not lazy)
            else:
                r = p = t = None
                alpha, beta = static_alpha, static_beta.clone()
                x, mixed, saved, x_rstd = native_ops.hc_forward(h, alpha, save_bf16, kn, norm_eps, not lazy)
            if lazy:
                mixed = placeholder(h)
            if saved is None and saved_copy is None:
                saved = h if save_dtype == compute else streams.contiguous()
            out = x
            if not ctx.kernel_norm:
                out, x_rstd = branch_norm(x, norm_w, norm_eps)
        else:
            if dyn_wt is not None:
                r = rms_rstd(h, stream_eps)  # (B, T, n, 1)
                p = _project(h, dyn_wt)  # H W: (B, T, n, n+2)
                t = p * r
                if use_tanh:
                    t = t.tanh()
                alpha = t[..., : n + 1] * s_alpha + static_alpha  # (B, T, n, n+1)
                beta = t[..., n + 1] * s_beta + static_beta  # (B, T, n)
            else:
                r = p = t = None
                alpha, beta = static_alpha, static_beta.clone()
            # the one copy of H kept for backward: in the save dtype, made from the original streams
            saved = h if h.dtype == save_dtype or saved_copy is not None else streams.to(save_dtype).contiguous()
            out, mixed, x_rstd = mix_forward(h, alpha, norm_w, norm_eps)
        # H is the only n*d tensor kept, or none when it can be rebuilt from what earlier nodes
        # keep anyway; the rest is O(n^2) per token or parameters.
        if saved_copy is not None:
            saved = saved_copy
        if source is not None:
            saved = None
        kept = kept_outputs(ctx, saved if keep and streams.dtype != save_dtype and saved_copy is None else None,
                            alpha if dyn_wt is not None and (keep or lazy) else None)
        ctx.save_for_backward(saved, static_alpha, dyn_wt, s_alpha, s_beta, norm_w,
                              alpha, r, p, t, x_rstd, *(source or (None,) * 4))
        ctx.use_tanh = use_tanh
        return out.to(ctx.h_dtype), mixed, beta, *kept

    @staticmethod
    def backward(ctx, g_out, g_mixed, g_beta, *_):
        with torch.autocast(g_out.device.type, enabled=False):  # backward may run under autocast
            return WidthConnection._backward(ctx, g_out, g_mixed, g_beta)

    @staticmethod
    def _backward(ctx, g_out, g_mixed, g_beta):
        h, static_alpha, dyn_wt, s_alpha, s_beta, norm_w, alpha, r, p, t, x_rstd, *source = ctx.saved_tensors
        compute = alpha.dtype  # fp32, or fp64
        n, d = alpha.shape[-2], g_out.shape[-1]
        h, src = backward_streams(h, source, compute, ctx.h_dtype, ctx.native)
        g_wt = None
        if ctx.native:
            dynamic = () if dyn_wt is None else (g_beta, t, r, p, dyn_wt, s_alpha, s_beta, ctx.use_tanh)
            offer = ctx.depth_grad
            depth = offer.request(g_out, n, d, compute) if offer is not None else None
            g_h, g_alpha_tok, g_wt, g_norm_w = kernel_mix_backward(
                h, src, alpha, g_out, g_mixed, norm_w, x_rstd, ctx.kernel_norm, ctx.needs_input_grad[6],
                ctx.h_dtype != compute, dynamic, depth)
            if depth is not None:
                offer.fill(g_h, *depth[2:])  # g_h is the gradient returned for h (h_dtype == compute)
        else:
            h = h.to(compute)
            g_h, g_alpha_tok, g_norm_w = mix_backward(h, alpha, norm_w, x_rstd, g_out, g_mixed,
                                                      ctx.needs_input_grad[6])
        g_static_alpha = g_alpha_tok if static_alpha.dim() > 2 else g_alpha_tok.reshape(-1, n, n + 1).sum(0)
        if dyn_wt is None:
            return (g_h.to(ctx.h_dtype), g_static_alpha, g_beta, None, None, None, g_norm_w,
                    None, None, None, None, None, None, None, None, None)
        if g_beta is None:
            g_beta = torch.zeros_like(t[..., 0])
        g_static_beta = g_beta.reshape(-1, n).sum(0)
        g_sa = (g_alpha_tok * t[..., : n + 1]).sum().reshape(1)
        g_sb = (g_beta * t[..., n + 1]).sum().reshape(1)
        if g_wt is None:  # the PyTorch path: the dynamic weights' chain here
            g_z = torch.cat([g_alpha_tok * s_alpha, (g_beta * s_beta).unsqueeze(-1)], dim=-1)
            if ctx.use_tanh:
                g_z = g_z * (1 - t.square())
            g_p = (g_z * r).reshape(-1, n + 2)  # dL/dP for P = H W, (B*T*n, n+2)
            h_flat = h.reshape(-1, d)
            g_wt = g_p.T.contiguous() @ h_flat  # (n+2, d)
            g_h.view(-1, d).addmm_(g_p, dyn_wt)  # += dL/dP Wt
            g_h.addcmul_(h, (g_z * p).sum(-1, keepdim=True) * r.pow(3), value=-1.0 / d)  # via r(H)
        return (g_h.to(ctx.h_dtype), g_static_alpha, g_static_beta, g_wt, g_sa, g_sb, g_norm_w,
                None, None, None, None, None, None, None, None, None)

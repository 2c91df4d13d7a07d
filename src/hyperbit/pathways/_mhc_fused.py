"""The memory-lean width connection of mHC (:class:`~hyperbit.pathways.ManifoldHyperConnection`).

Plain autograd through mHC's width connection keeps, per branch, the streams in fp32 twice (for
the projection of the flattened state and for the stream mixing), the whole ``(n+1, d)`` mix, the
norm's input, and turns the two slices of the mix into two zero-filled full-size gradients in
backward. This node keeps the streams once (in their own dtype, or the autocast dtype when
autocast is on, as :class:`~hyperbit.pathways._hc_fused.WidthConnection` does), the projections
``z`` (``2n + r`` numbers per token), the per-token rstds and the small autograd graph of the
per-token map (below), and recomputes the rest.

Forward, for ``H`` (B, T, n, d) flattened to ``x`` (B, T, nd)::

    z = rmsnorm(x) phi^T = (x phi^T) * r          r = rsqrt(mean(x^2) + eps)     (B, T, m)
    pre, post, res = weights(z, biases, gates)     sigmoid, 2 sigmoid, Sinkhorn or Birkhoff
    out, mixed = norm(pre H), res H                the mixing of ``_hc_fused.mix_forward``

The per-token map ``weights`` runs under autograd in forward, from a detached copy of ``z``, and
its graph is kept on the node: O(m) numbers per token (the Sinkhorn keeps only its logits, see
:mod:`.sinkhorn`), so backward need not run it again. Backward:
:func:`~hyperbit.pathways._hc_fused.mix_backward` gives ``dL/dH`` through the mixing and
``dL/d[pre | res^T]`` per token; the kept graph gives ``dL/dz`` and the gradients of the biases
and gates; then, with ``g_z = dL/dz``::

    dL/dphi = (g_z r)^T x        dL/dx += (g_z r) phi - x r^2/(nd) * sum_k g_z[k] z[k]

With the C kernels (CPU, n >= 2; :data:`MHC_KERNELS`) and res from Sinkhorn, the width connection
is another node, :class:`ManifoldKernelWidth`: forward and backward each one pass over the streams
per block of tokens (``nn.native_mhc``), in eager mode and inside ``torch.compile``. With
res="permutations" this node's map keeps its graph and backward makes two passes (C) around its
reverse. Elsewhere the mixing's reverse comes first and the projection's terms are added over
chunks of tokens (:func:`projection_backward`); inside ``torch.compile`` those cases run as three
nodes (:class:`ProjectStreams`, the map in plain autograd, HC's mixing node).

Every value and gradient is checked against the plain autograd path in the tests.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..nn import native, native_mhc, native_ops
from ..nn.norm import rms_rstd
from .sinkhorn import _DEFICIT_FLOOR, LOGIT_RANGE
from ._hc_fused import (_native_ok, _project, backward_streams, branch_norm, kept_outputs, kernel_dtypes,
                        kernel_mix_backward, mix_backward, mix_forward, placeholder, rebuild_streams)

#: ``(z, b_pre, b_post, b_res, a_pre, a_post, a_res) -> pre, post, res``: the per-token map from
#: the projections to the connection weights
WeightsFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


def alpha_of(pre: Tensor, res: Tensor) -> Tensor:
    """mHC's weights in HC's form ``alpha = [A_m | A_r] = [pre | res^T]`` (B, T, n, n+1)."""
    return torch.cat([pre.unsqueeze(-1), res.transpose(-1, -2)], dim=-1)


#: tokens per chunk of the flat streams in backward (n*d each: 2 MiB in fp32 at n*d = 1024;
#: measured 16% faster than one full-size widened copy and product at 2,048 tokens)
_CHUNK = 512
#: with the C kernels, mHC's own kernels: for n >= 2 with res from Sinkhorn
#: :class:`ManifoldKernelWidth` (``nn.native_mhc.mhc_forward`` and ``mhc_backward_fused``, each
#: one pass over the streams); with res="permutations" the projection (``mhc_project``) and the
#: backward in two passes around the map's reverse in PyTorch. Both backwards run the depth
#: backward before. False: those parts in PyTorch ops around the mixing kernels HC shares (a
#: vector norm and a GEMM forward; the map under autograd; the projection's backward over chunks
#: of tokens, :func:`projection_backward`), as with one stream. The gradients agree to round-off.
MHC_KERNELS = True


def _flat_streams(h: Tensor | None, source: tuple[Tensor, ...] | None, lo: int, hi: int,
                  compute: torch.dtype, dtype: torch.dtype) -> Tensor:
    """Tokens ``lo:hi`` of the streams flattened to ``(tokens, n*d)`` in ``compute``: from ``h``
    (any dtype), or rebuilt from ``source`` (:func:`~._hc_fused.rebuild_streams`, C kernel)."""
    if h is not None:
        return h.reshape(-1, h.shape[-2] * h.shape[-1])[lo:hi].to(compute)
    prev, alpha, beta, y = source
    n, d = prev.shape[-2:]
    tok = lambda t, k: t.reshape(-1, *t.shape[-k:])[lo:hi] if t.dim() > k else t  # noqa: E731
    return rebuild_streams(tok(prev, 2), tok(alpha, 2), tok(beta, 1), tok(y, 1), compute, dtype,
                           use_native=True).view(-1, n * d)


def projection_backward(g_z: Tensor, z: Tensor, r: Tensor, phi: Tensor, h: Tensor | None,
                        src: tuple[Tensor, ...] | None, dtype: torch.dtype, g_x: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """The backward of ``z = (x phi^T) r``, ``x`` the flat streams (B*T, nd) read from ``h`` or
    rebuilt from ``src`` (:func:`_flat_streams`; the streams' dtype ``dtype``): dL/dx, added in
    place to ``g_x`` (B*T, nd) when given, and dL/dphi."""
    compute = phi.dtype
    g_z = g_z.to(compute)
    g_p = (g_z * r).flatten(0, -2)  # dL/d(x phi^T): (B*T, m)
    coef = ((g_z * z).sum(-1, keepdim=True) * r.square()).view(-1, 1)
    g_x = g_p @ phi if g_x is None else g_x.addmm_(g_p, phi)
    nd = g_x.shape[-1]
    # dL/dphi = g_p^T x and dL/dx -= x coef / nd, over chunks of tokens of the flat streams x
    # in the compute dtype (widened or rebuilt per chunk: no full-size fp32 copy)
    g_phi = torch.zeros_like(phi)
    for lo in range(0, g_x.shape[0], _CHUNK):
        x = _flat_streams(h, src, lo, lo + _CHUNK, compute, dtype)
        g_phi.addmm_(g_p[lo:lo + _CHUNK].T, x)
        g_x[lo:lo + _CHUNK].addcmul_(x, coef[lo:lo + _CHUNK], value=-1.0 / nd)
    return g_x, g_phi


def _streams_kept(ctx, h: Tensor, streams: Tensor, mixed: Tensor | None, saved: Tensor | None, alpha: Tensor,
                  save_dtype: torch.dtype, source, keep: bool, lazy: bool) -> tuple:
    """The end of both mHC width nodes' forward, for ``h`` (the streams in the compute dtype) and
    ``streams`` (as given): ``mixed`` a placeholder when the depth node mixes (``lazy``); the copy
    of the streams kept for backward (``saved``, a kernel's bf16 copy, else ``h`` or the streams
    as given; none when ``source`` rebuilds them); the kept outputs (:func:`~._hc_fused.kept_outputs`).
    Returns ``(mixed, saved, kept)``."""
    if lazy:
        mixed = placeholder(h)
    if saved is None:
        saved = h if h.dtype == save_dtype else streams.contiguous()
    if source is not None:
        saved = None
    kept = kept_outputs(ctx, saved if keep and streams.dtype != save_dtype else None, alpha if keep or lazy else None)
    return mixed, saved, kept


def kernels_take(h: Tensor, phi: Tensor, save_dtype: torch.dtype, res: str) -> bool:
    """Whether :class:`ManifoldKernelWidth` runs this width connection: :data:`MHC_KERNELS` on, the
    C kernels built, CPU, 2 <= n <= ``native.HC_MAX_N``, res from Sinkhorn, the compute dtype (that
    of ``phi``) fp32 or fp64 and the saved copy of the streams in one the kernels read."""
    return (MHC_KERNELS and res == "sinkhorn" and 2 <= h.shape[-2] <= native.HC_MAX_N
            and h.device.type == "cpu" and save_dtype in kernel_dtypes(phi.dtype) and native.takes(phi))


class ManifoldKernelWidth(torch.autograd.Function):
    """mHC's width connection in mHC's own C kernels (where :func:`kernels_take`): forward and
    backward each one pass over the streams per block of tokens (``nn.native_mhc``), eager and,
    as ``torch.library`` operators (``nn.native_ops``), inside ``torch.compile``. Forward: the
    projection, the map (no autograd graph: the kernel keeps the res logits) and the mixing with
    the branch norm. Backward: the mixing's reverse to dL/dalpha, the map's reverse to ``g_z``,
    then dL/dH whole (the mixing and both projection terms), dL/dphi, and (eager, when offered)
    the backward of the depth node before, whose output these streams are.

    ``b`` = [b_pre | b_post | b_res] and ``a`` = [a_pre, a_post, a_res] come concatenated, in the
    compute dtype; ``source``, ``keep``, ``lazy``, ``depth_grad`` as for :class:`ManifoldWidth`."""

    @staticmethod
    def forward(ctx, h: Tensor, phi: Tensor, stream_eps: float, b: Tensor, a: Tensor, norm_w: Tensor,
                norm_eps: float, iters: int, save_dtype: torch.dtype, source: tuple[Tensor, ...] | None = None,
                keep: bool = False, lazy: bool = False, depth_grad=None):
        ctx.h_dtype, streams = h.dtype, h
        compute = phi.dtype
        h = h.to(compute).contiguous()
        ctx.iters = iters
        ctx.depth_grad = depth_grad if ctx.h_dtype == compute else None  # (taken with fp32 streams)
        save_bf16 = save_dtype != compute and streams.dtype != save_dtype and source is None
        (out, mixed, saved, x_rstd), (z, r, logits, alpha, post) = native_ops.mhc_forward(
            h, phi, stream_eps, b, a, iters, LOGIT_RANGE, _DEFICIT_FLOOR, save_bf16, norm_w, norm_eps, not lazy)
        mixed, saved, kept = _streams_kept(ctx, h, streams, mixed, saved, alpha, save_dtype, source, keep, lazy)
        ctx.save_for_backward(saved, phi, a, norm_w, x_rstd, z, r, logits, alpha, post, *(source or (None,) * 4))
        return out.to(ctx.h_dtype), mixed, post, *kept

    @staticmethod
    def backward(ctx, g_out, g_mixed, g_post, *_):
        with torch.autocast(g_out.device.type, enabled=False):  # backward may run under autocast
            saved, phi, a, norm_w, x_rstd, z, r, logits, alpha, post, *source = ctx.saved_tensors
            compute = phi.dtype
            n, d = alpha.shape[-2], g_out.shape[-1]
            h, src = backward_streams(saved, source, compute, ctx.h_dtype, True)
            offer = ctx.depth_grad
            depth = offer.request(g_out, n, d, compute) if offer is not None else None
            g_h, g_phi, g_par, g_norm_w = native_ops.mhc_backward_fused(
                h, alpha, g_out.to(compute), None if g_mixed is None else g_mixed.to(compute),
                (x_rstd, norm_w, ctx.needs_input_grad[5]), z, r, logits, post,
                None if g_post is None else g_post.to(compute), a, ctx.iters, LOGIT_RANGE, _DEFICIT_FLOOR, phi,
                src, ctx.h_dtype != compute, depth)
            if depth is not None:
                offer.fill(g_h, *depth[2:])  # g_h is the gradient returned for h (h_dtype == compute)
            g_b, g_a = g_par.split([g_par.numel() - 3, 3])
            return g_h.to(ctx.h_dtype), g_phi, None, g_b, g_a, g_norm_w, *(None,) * 7


class ManifoldWidth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, phi: Tensor, stream_eps: float, weights: WeightsFn,
                b_pre: Tensor, b_post: Tensor, b_res: Tensor, a_pre: Tensor, a_post: Tensor,
                a_res: Tensor, norm_w: Tensor, norm_eps: float, save_dtype: torch.dtype,
                source: tuple[Tensor, ...] | None = None, keep: bool = False, lazy: bool = False,
                depth_grad=None):
        # source / keep / lazy / depth_grad: as for _hc_fused.WidthConnection (the streams rebuilt
        # in backward from what the previous connection's nodes keep, instead of a copy; the
        # mixing left to the depth node; the depth node's backward run in this node's kernel)
        # phi, the biases, gates and norm gain come in the compute dtype (fp32, or fp64)
        ctx.h_dtype, streams = h.dtype, h
        h = h.to(phi.dtype).contiguous()  # expand_streams' broadcast view would slow the products
        ctx.native = _native_ok(h, phi.dtype, save_dtype)
        ctx.own_kernels = ctx.native and MHC_KERNELS
        # the branch norm in the kernels too, except with one stream (then PyTorch's, as Pre-Norm's)
        ctx.kernel_norm = ctx.native and h.shape[-2] >= 2
        # mHC's backward kernels also run the depth node's backward before (its offer, taken with
        # streams in fp32)
        ctx.depth_grad = depth_grad if ctx.kernel_norm and ctx.own_kernels and ctx.h_dtype == phi.dtype else None
        save_bf16 = save_dtype != h.dtype and streams.dtype != save_dtype and source is None
        kernel_norm_w = norm_w if ctx.kernel_norm else None
        x = h.flatten(-2)  # (B, T, nd)
        if ctx.own_kernels:  # the norm's rstd and the projection in one pass (C)
            z, r = native_mhc.mhc_project(x, phi, stream_eps)
        else:
            r = rms_rstd(x, stream_eps)  # (B, T, 1)
            z = _project(x, phi) * r  # (B, T, m)
        # The per-token map under autograd, its small graph kept for backward (O(m) numbers per
        # token: the Sinkhorn op keeps only its logits), so backward does not re-run it.
        ctx.inputs = [z.detach().requires_grad_(True)] + [
            p.detach().requires_grad_(True) for p in (b_pre, b_post, b_res, a_pre, a_post, a_res)]
        with torch.enable_grad():
            pre, ctx.post, res = weights(*ctx.inputs)
            ctx.alpha = alpha_of(pre, res)  # (B, T, n, n+1)
        alpha = ctx.alpha.detach()
        if ctx.native:  # the mixing and the bf16 copy of H in one pass per token (C)
            out, mixed, saved, x_rstd = native_ops.hc_forward(h, alpha, save_bf16, kernel_norm_w, norm_eps,
                                                              not lazy)
            if not ctx.kernel_norm:
                out, x_rstd = branch_norm(out, norm_w, norm_eps)
        else:  # (lazy only with the kernels: mixes_in_depth)
            saved = h if h.dtype == save_dtype else streams.to(save_dtype).contiguous()
            out, mixed, x_rstd = mix_forward(h, alpha, norm_w, norm_eps)
        mixed, saved, kept = _streams_kept(ctx, h, streams, mixed, saved, alpha, save_dtype, source, keep, lazy)
        ctx.save_for_backward(saved, phi, norm_w, r, x_rstd, z, *(source or (None,) * 4))
        return out.to(ctx.h_dtype), mixed, ctx.post.detach(), *kept

    @staticmethod
    def backward(ctx, g_out, g_mixed, g_post, *_):
        with torch.autocast(g_out.device.type, enabled=False):  # backward may run under autocast
            return ManifoldWidth._backward(ctx, g_out, g_mixed, g_post)

    @staticmethod
    def _backward(ctx, g_out, g_mixed, g_post):
        saved, phi, norm_w, r, x_rstd, z, *source = ctx.saved_tensors
        compute = phi.dtype
        alpha = ctx.alpha.detach()
        n, d = alpha.shape[-2], g_out.shape[-1]
        # the kernels read the saved copy as it is (bf16 under autocast) or rebuild each token's
        # streams themselves; the flat products below widen a chunk at a time
        h, src = backward_streams(saved, source, compute, ctx.h_dtype, ctx.native)
        if ctx.kernel_norm and ctx.own_kernels:
            return ManifoldWidth._kernel_backward(ctx, h, src, g_out, g_mixed, g_post, phi, norm_w, r, x_rstd, z)
        if ctx.native:
            g_h, g_alpha, _, g_norm_w = kernel_mix_backward(
                h, src, alpha, g_out, g_mixed, norm_w, x_rstd, ctx.kernel_norm, ctx.needs_input_grad[10],
                ctx.h_dtype != compute)
        else:
            h = h.to(compute)
            g_h, g_alpha, g_norm_w = mix_backward(h, alpha, norm_w, x_rstd, g_out, g_mixed,
                                                  ctx.needs_input_grad[10])
        g_z, g_small = ManifoldWidth._map_backward(ctx, g_alpha, g_post)
        _, g_phi = projection_backward(g_z, z, r, phi, h, src, ctx.h_dtype, g_h.view(-1, n * d))
        return ManifoldWidth._gradients(ctx, g_h, g_phi, g_small, g_norm_w)

    @staticmethod
    def _gradients(ctx, g_h: Tensor, g_phi: Tensor, g_small, g_norm_w: Tensor | None) -> tuple:
        """forward's inputs' gradients: h, phi, the six biases and gates, the norm's gain (the rest
        are not differentiable)."""
        return (g_h.to(ctx.h_dtype), g_phi, None, None, *g_small, g_norm_w) + (None,) * 7

    @staticmethod
    def _map_backward(ctx, g_alpha: Tensor, g_post: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
        """dL/dz and the gradients of the biases and gates (b_pre, b_post, b_res, a_pre, a_post,
        a_res) from dL/dalpha and dL/dpost, through the map's kept graph."""
        outputs, grads = [ctx.alpha], [g_alpha]
        if g_post is not None:
            outputs.append(ctx.post)
            grads.append(g_post.to(ctx.post.dtype))
        # retain_graph: the small graph is freed with this node, not by its first backward (a
        # backward with retain_graph=True may run this node again)
        g_z, *g_small = torch.autograd.grad(outputs, ctx.inputs, grads, allow_unused=True, retain_graph=True)
        return g_z, g_small

    @staticmethod
    def _kernel_backward(ctx, h, src, g_out, g_mixed, g_post, phi, norm_w, r, x_rstd, z):
        """The C kernels' backward: dL/dalpha per token (and the branch input's dL/dx) in one pass
        over the streams, the per-token map's reverse (its kept graph) to dL/dz, then dL/dH and
        dL/dphi in a second pass, with the depth backward before when offered."""
        compute = phi.dtype
        alpha = ctx.alpha.detach()
        n, d = alpha.shape[-2], g_out.shape[-1]
        round_bf16 = ctx.h_dtype != compute
        g_mixed = None if g_mixed is None else g_mixed.to(compute)
        g_alpha, g_xn, g_norm_w = native_mhc.hc_alpha_backward(
            h, alpha, g_out.to(compute), g_mixed, (x_rstd, norm_w, ctx.needs_input_grad[10]), src, round_bf16)
        g_z, g_small = ManifoldWidth._map_backward(ctx, g_alpha, g_post)
        g_z = g_z.to(compute)
        g_p = g_z * r  # dL/d(x phi^T)
        coef = (g_z * z).sum(-1) * r.squeeze(-1).square() / (n * d)
        offer = ctx.depth_grad
        depth = offer.request(g_out, n, d, compute) if offer is not None else None
        g_h, g_phi = native_mhc.mhc_backward(h, alpha, g_xn, g_mixed, g_p, coef, phi, src, round_bf16, depth)
        if depth is not None:
            offer.fill(g_h, *depth[2:])  # g_h is the gradient returned for h (h_dtype == compute)
        return ManifoldWidth._gradients(ctx, g_h, g_phi, g_small, g_norm_w)


class ProjectStreams(torch.autograd.Function):
    """mHC's projection ``z = norm(x) phi^T = (x phi^T) r`` of the flattened streams as a node of
    its own: the form of mHC's width connection inside ``torch.compile``, where
    :class:`ManifoldWidth`'s backward (an autograd call on the kept per-token graph) cannot be
    traced. There the per-token map runs in plain autograd between this node and the mixing
    (:class:`~._hc_fused.WidthConnection` with per-token weights), and this node makes the copy of
    the streams in the save dtype that both keep (returned for the mixing node; None when it is
    the streams themselves) or, given ``source``, keeps none and rebuilds them in backward.
    Backward is :class:`ManifoldWidth`'s, from ``dL/dz``."""

    @staticmethod
    def forward(ctx, h, phi, stream_eps, save_dtype, source=None):
        ctx.h_dtype, streams = h.dtype, h
        compute = phi.dtype
        h = h.to(compute).contiguous()
        x = h.flatten(-2)  # (B, T, nd)
        r = rms_rstd(x, stream_eps)  # (B, T, 1)
        z = _project(x, phi) * r  # (B, T, m)
        fresh = streams.dtype != save_dtype
        saved = streams.to(save_dtype).contiguous() if fresh and source is None else None
        keep_streams = source is None and not fresh  # kept as they are: the input itself
        ctx.native = _native_ok(h, compute, save_dtype)
        ctx.save_for_backward(saved, streams if keep_streams else None, phi, r, z, *(source or (None,) * 4))
        if saved is not None:
            ctx.mark_non_differentiable(saved)
        return z, saved

    @staticmethod
    def backward(ctx, g_z, _):
        with torch.autocast(g_z.device.type, enabled=False):
            saved, streams, phi, r, z, *source = ctx.saved_tensors
            compute = phi.dtype
            n, d = (streams if streams is not None else saved if saved is not None else source[0]).shape[-2:]
            h, src = backward_streams(streams if streams is not None else saved, source, compute,
                                      ctx.h_dtype, ctx.native)
            g_x, g_phi = projection_backward(g_z, z, r, phi, h, src, ctx.h_dtype)
            return g_x.view(*z.shape[:-1], n, d).to(ctx.h_dtype), g_phi, None, None, None

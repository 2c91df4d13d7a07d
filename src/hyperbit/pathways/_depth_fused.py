"""The depth connection's autograd nodes: ``H' = A_r^T H + beta^T y`` from the width node's
``mixed`` (:class:`DepthConnection`), or from the streams themselves when the width node left the
mixing to the depth node (:class:`DepthFromStreams`, ``_hc_fused.mixes_in_depth``). Shared by
hyper-connections and mHC; checked against plain autograd in the tests."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..nn import native_ops
from ._hc_fused import _bmm, _native_ok, kernel_dtypes


class DepthConnection(torch.autograd.Function):
    """``H' + beta^T y`` in one pass, rounded once to the streams' dtype; keeps ``y`` in its own
    dtype and beta, nothing full-size. On CPU (fp32 / fp64 streams, ``y`` in that dtype or bf16)
    forward and backward are C kernels (``nn/native.c``): one pass each, where the broadcasting
    ``addcmul`` and the two skinny products below make several."""

    @staticmethod
    def forward(ctx, mixed, beta, y, out_dtype):
        # mixed, beta in the compute dtype; beta: (n,) static or (B, T, n) dynamic;
        # y: (B, T, d) in any float dtype
        compute = mixed.dtype
        ctx.native = (out_dtype == compute and mixed.is_contiguous() and y.dtype in kernel_dtypes(compute)
                      and _native_ok(mixed, compute, compute))
        ctx.save_for_backward(beta, y)
        if ctx.native:
            return native_ops.depth_forward(mixed, beta, y)
        out = torch.addcmul(mixed, beta.unsqueeze(-1), y.to(mixed.dtype).unsqueeze(-2))
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        need_beta, need_y = ctx.needs_input_grad[1:3]
        return (*_depth_backward(ctx, g, need_beta, need_y), None)


def _kernel_y(y: Tensor, compute: torch.dtype) -> Tensor:
    """The branch output as the depth kernels read it: as it is in a dtype they take, else cast."""
    return y if y.dtype in kernel_dtypes(compute) else y.to(compute)


class DepthGradOffer:
    """A depth node's offer to the next width node, the one whose streams are this node's output
    H: that node's backward kernel, which writes dL/dH, runs this node's backward on it too (dL/dy
    and dL/dbeta, computed while dL/dH is in registers: one read of the n*d gradient less per
    branch; ``native.hc_backward(depth=...)``). This node uses the results only if the gradient it
    receives is that very tensor, unchanged since (else it computes its own), so a second use of H,
    whose gradient autograd adds in, or a change in place, cannot make it wrong. The offer holds
    no tensor until backward: the width node reads beta and y from this node's saved tensors
    (through a weak reference to the node), so saved-tensor hooks and activation checkpointing
    see them as they see any saved tensor. Eager only."""

    __slots__ = ("node", "saved", "g", "g_version", "g_y", "g_beta")

    def __init__(self) -> None:
        self.node = self.saved = self.g = self.g_y = self.g_beta = None
        self.g_version = -1

    def inputs(self, compute: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The depth node's (beta, y) as its backward kernel reads them, or None if the node is
        gone. The node's saved tensors are unpacked here, once (a checkpointed region's may be
        unpacked only once), and handed on to the node's own backward (:meth:`saved_tensors`)."""
        node = self.node() if self.node is not None else None
        if node is None:
            return None
        if self.saved is None:
            self.saved = node.saved_tensors
        beta, y = self.saved
        return beta, _kernel_y(y, compute)

    def saved_tensors(self, ctx) -> tuple[Tensor, ...]:
        """The depth node's saved tensors: those :meth:`inputs` unpacked, else ``ctx``'s."""
        saved, self.saved = self.saved, None
        return saved if saved is not None else ctx.saved_tensors

    def request(self, g_out: Tensor, n: int, d: int, compute: torch.dtype) -> tuple[Tensor, ...] | None:
        """The width backward kernel's ``depth`` argument (``native.hc_backward``): (beta, y) and
        empty dL/dy (B, T, d) and dL/dbeta (B, T, n) in ``compute`` for it to fill, the lead dims
        those of the width node's ``g_out``; None if the depth node is gone. Give the filled result
        back with :meth:`fill`."""
        inputs = self.inputs(compute)
        if inputs is None:
            return None
        lead = g_out.shape[:-1]
        return (*inputs, g_out.new_empty(*lead, d, dtype=compute), g_out.new_empty(*lead, n, dtype=compute))

    def fill(self, g: Tensor, g_y: Tensor, g_beta: Tensor) -> None:
        self.g, self.g_version, self.g_y, self.g_beta = g, g._version, g_y, g_beta

    def take(self, g: Tensor) -> tuple[Tensor, Tensor] | None:
        """(dL/dy, dL/dbeta per token) if ``g`` is the gradient they were computed from; the
        offer is spent either way."""
        ok = g is self.g and g._version == self.g_version
        out = (self.g_y, self.g_beta) if ok else None
        self.g = self.g_y = self.g_beta = None
        return out


def _depth_backward(ctx, g: Tensor, need_beta: bool, need_y: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dL/d mixed (= ``g``), dL/dbeta, dL/dy of ``mixed + beta^T y``, from ``(beta, y)`` saved, or
    from the next width node's backward (:class:`DepthGradOffer`)."""
    with torch.autocast(g.device.type, enabled=False):  # backward may run under autocast
        offer = getattr(ctx, "offer", None)
        beta, y = offer.saved_tensors(ctx) if offer is not None else ctx.saved_tensors
        taken = offer.take(g) if offer is not None else None
        g = g.to(beta.dtype)
        n = g.shape[-2]
        if taken is not None:
            g_y, g_beta = taken
            g_y = g_y.to(y.dtype) if need_y else None
            g_beta = g_beta if need_beta else None
        elif ctx.native:
            g_y, g_beta = native_ops.depth_backward(g, beta, y, need_y, need_beta)
            g_y = None if g_y is None else g_y.to(y.dtype)
        else:
            g_y = _bmm(beta.unsqueeze(-2), g).squeeze(-2).to(y.dtype) if need_y else None  # sum_i beta_i g_i
            g_beta = _bmm(g, y.to(g.dtype).unsqueeze(-1)).squeeze(-1) if need_beta else None  # <g_i, y>
        if g_beta is not None and beta.dim() == 1:
            g_beta = g_beta.reshape(-1, n).sum(0)
        return g, g_beta, g_y


class DepthFromStreams(torch.autograd.Function):
    """The depth connection of a width node that left the mixing to it (:func:`mixes_in_depth`):
    ``A_r^T H + beta^T y`` in one pass per token from the streams ``H`` themselves (C kernel
    ``hb_hc_streams``, the width kernel's mixing arithmetic: bit for bit what the width node's
    ``mixed`` plus :class:`DepthConnection` give). ``H`` and alpha come detached: the gradient of
    the mixing flows back through the width node's placeholder ``mixed`` (its backward receives
    dL/d(A_r^T H) = dL/d out, as from :class:`DepthConnection`). Keeps ``(beta, y)``."""

    @staticmethod
    def forward(ctx, placeholder, h, alpha, beta, y, offer=None):
        # h (B, T, n, d) in the compute dtype; alpha (n, n+1) or (B, T, n, n+1), beta (n,) or
        # (B, T, n) in it; y (B, T, d) in any float dtype; offer: a DepthGradOffer, or None
        compute = h.dtype
        ctx.native = True
        ctx.save_for_backward(beta, y)
        y = _kernel_y(y, compute)
        if offer is not None:
            offer.node = weakref.ref(ctx)
        ctx.offer = offer
        return native_ops.hc_rebuild(h, alpha, beta, y, compute)

    @staticmethod
    def backward(ctx, g):
        need_beta, need_y = ctx.needs_input_grad[3:5]
        g, g_beta, g_y = _depth_backward(ctx, g, need_beta, need_y)
        return g, None, None, g_beta, g_y, None


def depth_node(mixed: Tensor, beta: Tensor, y: Tensor, dtype: torch.dtype,
               streams: tuple[Tensor, Tensor] | None, offer: DepthGradOffer | None = None) -> Tensor:
    """The depth connection's node: :class:`DepthFromStreams` when the width node left the mixing
    to it (``streams`` = (H, alpha); with its ``offer`` to the next width node), else
    :class:`DepthConnection`."""
    if streams is not None:
        return DepthFromStreams.apply(mixed, *streams, beta, y, offer)
    return DepthConnection.apply(mixed, beta, y, dtype)

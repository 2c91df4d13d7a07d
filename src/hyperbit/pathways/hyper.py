"""Hyper-connections (Zhu et al., ICLR 2025): static (SHC) and dynamic (DHC), expansion rate n.

Per branch, with the state ``H`` of n streams (``(B, T, n, d)``)::

    alpha = [A_m | A_r]          (n, n+1)   static, or per token for DHC
    mix   = alpha^T H            (n+1, d)   row 0: branch input x = A_m^T H; rows 1..n: H' = A_r^T H
    out   = beta^T T(norm(x)) + H'          the branch output is added to stream i scaled by beta_i

Dynamic weights (spec section 3), with ``Hn = norm(H)`` per stream and zero-initialised ``W``::

    alpha(H) = s_alpha * tanh(Hn @ W_alpha) + alpha     W_alpha = [W_m | W_r]   (d, n+1)
    beta(H)  = s_beta  * tanh(Hn @ W_beta)  + beta      W_beta                  (d,)

At init ``beta = 1``, ``A_m = e_{k mod n}``, ``A_r = I`` and every stream carries the same vector,
so the network is exactly a Pre-Norm transformer (the tests prove it for every n).

Dtypes: the connection is computed in fp32 (fp64 for fp64 streams) whatever the parameter dtype
(fp32, bf16 or fp16) and the autocast dtype. The branch input and the new streams come back in the
dtype of the streams given, which a model makes from its embedding: the parameter dtype, as for
Pre-Norm's ``h + T(norm(h))`` (fp32 streams for an fp32 model under autocast, bf16 streams for a
bf16 model, each rounded once per branch). Parameter gradients come back in the parameter dtype.
Streams kept in bf16 under autocast instead (half the bytes) were measured too inaccurate to be the
default: over 32 DHC x4 blocks, 9x the gradient error of fp32 streams (``benchmarks/stream_dtype.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..nn.norm import RMSNorm
from ._depth_fused import DepthGradOffer, depth_node
from ._hc_fused import WidthConnection, kept_for_rebuild, mixes_in_depth
from .base import Branch, Pathway, check_streams, expand_streams, reduce_streams


class DepthContext(NamedTuple):
    """What :meth:`HyperConnection.width_connection` hands to ``depth_connection``."""

    #: A_r^T H, (B, T, n, d), in the compute dtype (fp32, or fp64); a placeholder when ``streams``
    #: is set (read :attr:`mixed`)
    mix: Tensor
    beta: Tensor  # (n,) static or (B, T, n) dynamic, in the compute dtype
    dtype: torch.dtype  # the streams' dtype: the new streams are returned in it
    #: (the streams the width node keeps for backward, alpha), or None: with the depth node's beta
    #: and branch output they rebuild the new streams (``_hc_fused.rebuild_streams``), so the next
    #: width node need not keep a copy of its own (:func:`_offer_rebuild`)
    kept: tuple[Tensor, Tensor] | None = None
    #: (H, alpha, H's version) when the width node left the mixing to the depth node
    #: (``_hc_fused.mixes_in_depth``: ``mix`` is then a placeholder), else None
    streams: tuple[Tensor, Tensor, int | None] | None = None

    @property
    def mixed(self) -> Tensor:
        """A_r^T H (B, T, n, d) in the compute dtype, differentiable (computed here from the
        streams when the width node left the mixing to the depth node)."""
        streams = streams_for_depth(self)
        if streams is None:
            return self.mix
        h, alpha = streams
        zero_y = h.new_zeros(h.shape[:-2] + h.shape[-1:])
        return depth_node(self.mix, self.beta.detach().new_zeros(h.shape[-2]), zero_y, self.dtype, streams)


class HyperConnection(Pathway):
    """One branch's hyper-connection. Use it around any branch of your own model::

        hc = HyperConnection(dim=512, expansion_rate=4, branch_index=k)
        H = hc(H, my_branch)                     # or, by hand:
        x, ctx = hc.width_connection(H)          #   x: (B, T, d) branch input (already normed)
        H = hc.depth_connection(ctx, my_branch(x))

    Args:
        dim: hidden size d.
        expansion_rate: number of streams n >= 1.
        branch_index: k, position of the branch in execution order (selects stream ``k mod n``).
        dynamic: input-dependent weights (DHC) or static ones (SHC).
        use_tanh: tanh on the dynamic projections.
        branch_norm: apply an RMSNorm to the branch input (False if your branch norms itself).
        matrix: optional fixed ``(n+1, n+1)`` connection matrix ``[[0, B], [A_m, A_r]]`` to start
            from instead of the Pre-Norm-equivalent init (the sequential / parallel presets).
        learnable: whether the static connection weights are trained (False for fixed presets).
    """

    #: use the memory-lean autograd nodes of ``_hc_fused`` (False: plain autograd, e.g. to let
    #: torch.compile fuse and rematerialise the reference computation itself; ``compile_blocks``
    #: in ``hyperbit.models`` sets it per instance)
    fused: bool = True

    def __init__(self, dim: int, expansion_rate: int, branch_index: int, *, dynamic: bool = True,
                 use_tanh: bool = True, branch_norm: bool = True, eps: float = 1e-6,
                 matrix: Tensor | None = None, learnable: bool = True):
        super().__init__()
        n = expansion_rate
        if n < 1:
            raise ValueError(f"expansion_rate must be >= 1, got {n}")
        self.dim, self.expansion_rate, self.branch_index = dim, n, branch_index
        self.dynamic, self.use_tanh = dynamic, use_tanh
        if matrix is None:
            matrix = pre_norm_matrix(n, branch_index)
        if matrix.shape != (n + 1, n + 1):
            raise ValueError(f"matrix must have shape {(n + 1, n + 1)}, got {tuple(matrix.shape)}")
        alpha, beta = matrix[1:, :].clone().float(), matrix[0, 1:].clone().float()  # (n, n+1), (n,)
        if learnable:
            self.static_alpha = nn.Parameter(alpha)
            self.static_beta = nn.Parameter(beta)
        else:
            self.register_buffer("static_alpha", alpha)
            self.register_buffer("static_beta", beta)
        self.norm = RMSNorm(dim, eps) if branch_norm else None
        if dynamic:
            self.stream_norm = RMSNorm(dim, eps, affine=False)  # parameter-free, as in the paper
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, n + 1))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
            self.dynamic_alpha_scale = nn.Parameter(torch.full((1,), 0.01))
            self.dynamic_beta_scale = nn.Parameter(torch.full((1,), 0.01))

    # -- the two halves ---------------------------------------------------------------------------
    def width_connection(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        """``h: (B, T, n, d)`` -> branch input ``(B, T, d)`` (normed) and the context for depth.

        With gradients on this is one memory-lean autograd node (see ``_hc_fused``); without, the
        plain reference computation. Both compute in fp32 (fp64 for fp64 streams) whatever the
        autocast and parameter dtypes; the branch input comes back in the dtype of ``h``.
        """
        self.check_streams(h, "width_connection")
        return self._width(h)

    def _width(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        if not (self.fused and torch.is_grad_enabled()):
            return self._width_reference(h)
        device, compute = h.device.type, _compute_dtype(h)
        save_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):  # the weights, cast to the compute dtype
            dyn_w, s_alpha, s_beta = dynamic_weights(self, compute)  # (n+2, d)
            norm_w = self.norm.weight.to(compute) if self.norm is not None else None
            stream_eps = self.stream_norm.eps if self.dynamic else 0.0
            norm_eps = self.norm.eps if self.norm is not None else 0.0
            source, static_alpha = _take_rebuild(h), self.static_alpha.to(compute)
            lazy = mixes_in_depth(h, compute, save_dtype)
            x, mixed, beta, saved, alpha = WidthConnection.apply(
                h, static_alpha, self.static_beta.to(compute), dyn_w, s_alpha, s_beta, norm_w,
                stream_eps, norm_eps, self.use_tanh, save_dtype, source, source is None, lazy, None,
                _take_depth_grad(h))
        kept = None if source is not None else kept_for_rebuild(saved, alpha, h, static_alpha)
        return x, DepthContext(mixed, beta, h.dtype, kept, depth_streams(lazy, h, alpha, static_alpha))

    def width_connection_reference(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        """The same computation in plain autograd (reference for tests, and for inference)."""
        self.check_streams(h, "width_connection_reference")
        return self._width_reference(h)

    def _width_reference(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        alpha, beta = self._connection_weights(h)
        with torch.autocast(h.device.type, enabled=False):
            mix = alpha.transpose(-1, -2) @ h.to(alpha.dtype)  # (B, T, n+1, d)
            x, mixed = mix[..., 0, :], mix[..., 1:, :]
            if self.norm is not None:
                x = self.norm(x)  # fp32 in, fp32 out (the gain is cast to the input's dtype)
        return x.to(h.dtype), DepthContext(mixed, beta, h.dtype)

    def connection_weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """alpha ``(n, n+1)`` or ``(B, T, n, n+1)`` and beta ``(n,)`` or ``(B, T, n)``, in fp32
        (fp64 for fp64 streams) whatever the parameter dtype."""
        self.check_streams(h, "connection_weights")
        return self._connection_weights(h)

    def _connection_weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        compute = _compute_dtype(h)
        alpha, beta = self.static_alpha.to(compute), self.static_beta.to(compute)
        if not self.dynamic:
            return alpha, beta
        with torch.autocast(h.device.type, enabled=False):
            hn = self.stream_norm(h.to(compute))  # (B, T, n, d)
            a = hn @ self.dynamic_alpha_fn.to(compute)  # (B, T, n, n+1)
            b = hn @ self.dynamic_beta_fn.to(compute)  # (B, T, n)
            if self.use_tanh:
                a, b = a.tanh(), b.tanh()
            return (a * self.dynamic_alpha_scale.to(compute) + alpha,
                    b * self.dynamic_beta_scale.to(compute) + beta)

    def depth_connection(self, ctx: DepthContext, y: Tensor) -> Tensor:
        """``H' + beta^T y``: add the branch output ``y: (B, T, d)`` to every stream, scaled.

        Computed in fp32 (``y`` is kept for backward in its own, e.g. autocast, dtype); the new
        streams come back in the dtype of the streams ``width_connection`` was given."""
        mixed = ctx.mix
        if y.shape != mixed.shape[:-2] + mixed.shape[-1:]:
            raise ValueError(f"depth_connection expects the branch output (B, T, d) = "
                             f"{tuple(mixed.shape[:-2] + mixed.shape[-1:])}, got shape {tuple(y.shape)}")
        if not (self.fused and torch.is_grad_enabled()):
            return self.depth_connection_reference(ctx, y)
        return fused_depth(self, ctx, y)  # (B, T, n, d)

    def depth_connection_reference(self, ctx: DepthContext, y: Tensor) -> Tensor:
        mixed, beta, dtype = ctx.mixed, ctx.beta, ctx.dtype
        with torch.autocast(y.device.type, enabled=False):
            return (mixed + beta.unsqueeze(-1) * y.to(mixed.dtype).unsqueeze(-2)).to(dtype)

    def forward(self, h: Tensor, branch: Branch) -> Tensor:
        """``h: (B, T, n, d)`` streams -> new streams, in the same dtype as ``h``."""
        self.check_streams(h)
        x, ctx = self._width(h)
        return self.depth_connection(ctx, branch(x))

    def check_streams(self, h: Tensor, where: str = "HyperConnection") -> None:
        """One-line ValueError unless ``h`` is ``(B, T, n, d)`` streams of this connection's n and d
        (shapes only: nothing is read from the tensor, no device sync)."""
        check_streams(h, self.expansion_rate, self.dim, where=where)

    def expand(self, h: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, n, d)``: n identical streams."""
        return expand_streams(h, self.expansion_rate)

    def reduce(self, h: Tensor) -> Tensor:
        """``(B, T, n, d) -> (B, T, d)``: the sum of the streams."""
        return reduce_streams(h, self.expansion_rate)

    # -- introspection ---------------------------------------------------------------------------
    def matrix(self) -> Tensor:
        """The static connection matrix ``[[0, B], [A_m, A_r]]`` (n+1, n+1)."""
        n = self.expansion_rate
        m = torch.zeros(n + 1, n + 1, device=self.static_alpha.device)
        m[0, 1:] = self.static_beta.detach()
        m[1:, :] = self.static_alpha.detach()
        return m

    def no_weight_decay(self) -> set[str]:
        """Static connection weights and the dynamic gains are not decayed (spec section 2)."""
        return static_and_gain_names(self.dynamic)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"dim={self.dim}, expansion_rate={self.expansion_rate}, branch={self.branch_index}, {kind}, tanh={self.use_tanh}"


# Saved streams, every other branch. A width node keeps the streams it was given for backward
# (n*d per token, bf16 under autocast). When those streams are what the previous connection's
# depth node just returned, the tensors that the previous width and depth nodes keep for their own
# backward already determine them (H' = A_r^T H + beta y): the width node keeps references to
# those instead of a copy and rebuilds the streams in backward (per token inside the backward
# kernels on CPU; tensors modified in place after they were saved fail backward, as autograd does).
# A node that rebuilds offers nothing to the next one, so every other branch keeps a copy. The
# offer is an attribute of the returned tensor, with its version: an in-place change of the
# streams in between cancels it. Inside torch.compile a tensor's version cannot be read, so there
# only a pathway whose block hands its output straight to the next pathway (``feeds_next``, set by
# ``models.Block``) offers; the compiled graph then keeps the source tensors once for both nodes.
_REBUILD = "_hyperbit_rebuild"
#: rebuild the streams of every other branch in backward instead of keeping a copy (False: every
#: width connection keeps its own copy; the gradients are the same, bit for bit without autocast)
REBUILD_STREAMS = True
_DEPTH_GRAD = "_hyperbit_depth_grad"
#: run a depth connection's backward inside the next width connection's backward kernel (eager,
#: CPU kernels; False: its own kernel; the gradients are the same, bit for bit)
FUSE_DEPTH_BACKWARD = True


def depth_streams(lazy: bool, h: Tensor, alpha: Tensor | None, static_alpha: Tensor
                  ) -> tuple[Tensor, Tensor, int | None] | None:
    """``DepthContext.streams`` for a width node that left the mixing to the depth node (``lazy``):
    its input streams, its alpha (returned per token, or the static one) and the streams' version
    (None inside torch.compile, where it cannot be read)."""
    if not lazy:
        return None
    version = None if torch.compiler.is_compiling() else h._version
    return h.detach(), (static_alpha if alpha is None else alpha).detach(), version


def streams_for_depth(ctx: DepthContext) -> tuple[Tensor, Tensor] | None:
    """(H, alpha) for the depth node from ``ctx.streams``; a changed version of H (changed in place
    while the branch ran) is an error, as autograd's for a changed saved tensor."""
    if ctx.streams is None:
        return None
    h, alpha, version = ctx.streams
    if version is not None and h._version != version:
        raise RuntimeError("the streams given to width_connection were modified in place before "
                           "depth_connection: the depth connection reads them (mixing A_r^T H)")
    return h, alpha


def fused_depth(pathway: nn.Module, ctx: DepthContext, y: Tensor) -> Tensor:
    """The depth connection's autograd node (``_depth_fused.depth_node``) for a width node's
    ``ctx``, and its offers to the next width node: the streams' rebuild (:func:`_offer_rebuild`)
    when ``ctx.kept``, and eager, when the depth node mixes, its own backward
    (:class:`~._depth_fused.DepthGradOffer`)."""
    streams = streams_for_depth(ctx)
    offer = (DepthGradOffer() if streams is not None and FUSE_DEPTH_BACKWARD
             and not torch.compiler.is_compiling() else None)
    with torch.autocast(y.device.type, enabled=False):
        out = depth_node(ctx.mix, ctx.beta, y, ctx.dtype, streams, offer)
    if ctx.kept is not None:
        _offer_rebuild(pathway, out, (*ctx.kept, ctx.beta.detach(), y.detach()))
    if offer is not None:
        setattr(out, _DEPTH_GRAD, (out._version, offer))
    return out


def _offer_rebuild(pathway: nn.Module, out: Tensor, source: tuple[Tensor, ...]) -> None:
    if not torch.compiler.is_compiling():
        setattr(out, _REBUILD, (out._version, source))
    elif pathway.feeds_next:
        setattr(out, _REBUILD, (None, source))


def _take_rebuild(h: Tensor) -> tuple[Tensor, ...] | None:
    if not REBUILD_STREAMS:
        return None
    offer = getattr(h, _REBUILD, None)
    if offer is None:
        return None
    if torch.compiler.is_compiling():  # made by a pathway whose output comes straight here
        return offer[1] if offer[0] is None else None
    return offer[1] if offer[0] == h._version else None


def _take_depth_grad(h: Tensor) -> DepthGradOffer | None:
    """The depth node's :class:`~._depth_fused.DepthGradOffer` made with ``h``, if ``h`` is unchanged."""
    offer = getattr(h, _DEPTH_GRAD, None)
    return offer[1] if offer is not None and offer[0] == h._version else None


def static_and_gain_names(dynamic: bool) -> set[str]:
    """The parameters of a hyper- or frac-connection that get no weight decay: the static
    connection weights and, when dynamic, the gains of the dynamic part."""
    names = {"static_alpha", "static_beta"}
    return names | {"dynamic_alpha_scale", "dynamic_beta_scale"} if dynamic else names


def dynamic_weights(connection: nn.Module, compute: torch.dtype
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """A dynamic connection's projections packed as one ``(k+1, c)`` matrix ``[W_alpha^T; W_beta]``
    and its gains ``s_alpha``, ``s_beta``, in ``compute``; three Nones for a static one. Shared by
    hyper- and frac-connections (the same parameter names)."""
    if not connection.dynamic:
        return None, None, None
    packed = torch.cat([connection.dynamic_alpha_fn.T.to(compute),
                        connection.dynamic_beta_fn.unsqueeze(0).to(compute)])
    return (packed, connection.dynamic_alpha_scale.to(compute),
            connection.dynamic_beta_scale.to(compute))


def _compute_dtype(h: Tensor) -> torch.dtype:
    """Connections are computed in fp32 (fp64 if the state is fp64), never in autocast dtypes."""
    return torch.promote_types(h.dtype, torch.float32)


def pre_norm_matrix(expansion_rate: int, branch_index: int) -> Tensor:
    """The init that makes HC equal Pre-Norm: ``B = 1``, ``A_m = e_{k mod n}``, ``A_r = I``."""
    n = expansion_rate
    m = torch.zeros(n + 1, n + 1)
    m[0, 1:] = 1.0
    m[1 + branch_index % n, 0] = 1.0
    m[1:, 1:] = torch.eye(n)
    return m


def sequential_matrix() -> Tensor:
    """n = 2 fixed matrix that makes the network an ordinary sequential residual network."""
    return torch.tensor([[0.0, 1, 1], [1, 1, 0], [0, 0, 1]])


def parallel_matrix(expansion_rate: int, branch_index: int) -> Tensor:
    """Fixed matrices that run every group of n consecutive branches in parallel (spec section 4).

    The first branch of a group reads the sum of the streams and resets every stream to that sum
    (``A_m = 1``, ``A_r = 1``); the i-th writes only to stream i and reads stream i, which still
    holds the group's input. A group therefore maps the stream sum ``s`` to ``n s + sum_i T_i(s)``.
    """
    n = expansion_rate
    i = branch_index % n
    m = torch.zeros(n + 1, n + 1)
    m[0, 1 + i] = 1.0  # B = e_i
    if i == 0:
        m[1:, :] = 1.0  # A_m = 1, A_r = 1
    else:
        m[1 + i, 0] = 1.0  # A_m = e_i
        m[1:, 1:] = torch.eye(n)
    return m


def output_std_scale(expansion_rate: int) -> float:
    """Init std factor of branch output projections: the n streams are summed at the end, so each
    branch's output projection starts with std divided by sqrt(n) (spec section 2)."""
    return 1.0 / math.sqrt(expansion_rate)

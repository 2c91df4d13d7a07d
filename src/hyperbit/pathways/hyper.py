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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.norm import RMSNorm
from ._hc_fused import DepthConnection, WidthConnection
from .base import Branch, Pathway, expand_streams, reduce_streams


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
    #: torch.compile fuse and rematerialise the reference computation itself)
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
    def width_connection(self, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``h: (B, T, n, d)`` -> branch input ``(B, T, d)`` (normed) and the context for depth.

        With gradients on this is one memory-lean autograd node (see ``_hc_fused``); without, the
        plain reference computation. Both compute in fp32 whatever the autocast dtype.
        """
        if not (self.fused and torch.is_grad_enabled()):
            return self.width_connection_reference(h)
        device, compute = h.device.type, _compute_dtype(h)
        save_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else compute
        dyn_w = s_alpha = s_beta = None
        if self.dynamic:
            dyn_w = torch.cat([self.dynamic_alpha_fn.T, self.dynamic_beta_fn.unsqueeze(0)])  # (n+2, d)
            s_alpha, s_beta = self.dynamic_alpha_scale, self.dynamic_beta_scale
        norm_w = self.norm.weight if self.norm is not None else None
        stream_eps = self.stream_norm.eps if self.dynamic else 0.0
        norm_eps = self.norm.eps if self.norm is not None else 0.0
        h = h.to(compute).contiguous()  # the broadcast view from expand_streams would slow bmm
        with torch.autocast(device, enabled=False):
            x, mixed, beta = WidthConnection.apply(
                h, self.static_alpha, self.static_beta, dyn_w, s_alpha, s_beta, norm_w,
                stream_eps, norm_eps, self.use_tanh, save_dtype)
        return x, (mixed, beta)

    def width_connection_reference(self, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The same computation in plain autograd (reference for tests, and for inference)."""
        alpha, beta = self.connection_weights(h)
        with torch.autocast(h.device.type, enabled=False):
            mix = alpha.transpose(-1, -2) @ h.to(_compute_dtype(h))  # (B, T, n+1, d)
            x, mixed = mix[..., 0, :], mix[..., 1:, :]
            if self.norm is not None:
                x = self.norm(x)
        return x, (mixed, beta)

    def connection_weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """alpha ``(n, n+1)`` or ``(B, T, n, n+1)`` and beta ``(n,)`` or ``(B, T, n)``, in fp32."""
        alpha, beta = self.static_alpha, self.static_beta
        if not self.dynamic:
            return alpha, beta
        with torch.autocast(h.device.type, enabled=False):
            hn = self.stream_norm(h.to(_compute_dtype(h)))  # (B, T, n, d)
            a = hn @ self.dynamic_alpha_fn  # (B, T, n, n+1)
            b = hn @ self.dynamic_beta_fn  # (B, T, n)
            if self.use_tanh:
                a, b = a.tanh(), b.tanh()
            return a * self.dynamic_alpha_scale + alpha, b * self.dynamic_beta_scale + beta

    def depth_connection(self, ctx: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        """``H' + beta^T y``: add the branch output ``y: (B, T, d)`` to every stream, scaled.

        ``y`` is kept for backward in its own (autocast) dtype; the result is fp32."""
        if not (self.fused and torch.is_grad_enabled()):
            return self.depth_connection_reference(ctx, y)
        mixed, beta = ctx
        with torch.autocast(y.device.type, enabled=False):
            return DepthConnection.apply(mixed, beta, y)  # (B, T, n, d)

    def depth_connection_reference(self, ctx: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        mixed, beta = ctx
        with torch.autocast(y.device.type, enabled=False):
            return mixed + beta.unsqueeze(-1) * y.to(mixed.dtype).unsqueeze(-2)

    def forward(self, h: Tensor, branch: Branch) -> Tensor:
        x, ctx = self.width_connection(h)
        return self.depth_connection(ctx, branch(x))

    def expand(self, h: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, n, d)``: n identical streams."""
        return expand_streams(h, self.expansion_rate)

    def reduce(self, h: Tensor) -> Tensor:
        """``(B, T, n, d) -> (B, T, d)``: the sum of the streams."""
        return reduce_streams(h)

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
        names = {"static_alpha", "static_beta"}
        if self.dynamic:
            names |= {"dynamic_alpha_scale", "dynamic_beta_scale"}
        return names

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"dim={self.dim}, expansion_rate={self.expansion_rate}, branch={self.branch_index}, {kind}, tanh={self.use_tanh}"


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

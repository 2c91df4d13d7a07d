"""Frac-connections (Zhu et al., arXiv 2503.14125): spec section 7, static and dynamic, m fractions.

Instead of copying the hidden state into n streams (hyper-connections), frac-connections split it
into m fractions of size c = d / m. The state is the hidden state itself, viewed as fractions::

    expand:  h (B, T, d)    -> F (B, T, m, c)     a reshape (a view: no copy, no extra memory)
    reduce:  F (B, T, m, c) -> h (B, T, d)        the inverse: concatenation of the fractions

Per branch, the connection ``[[0, B], [A_m, A_r]]`` acts on fractions, B in R^m (a row),
A_m, A_r in R^{m x m}, packed as ``alpha = [A_m | A_r]`` of shape (m, 2m)::

    mix = alpha^T F                            (2m, c)
    x   = concat_i (A_m^T F)_i                 (d)     rows 0..m-1 of mix, concatenated
    H'  = A_r^T F                              (m, c)  rows m..2m-1 of mix
    y   = T(norm(x))                           (d)     norm: this pathway's RMSNorm over d
    F_i <- H'_i + B_i y_i                      y_i = y[i c : (i+1) c], the i-th fraction of y

i.e. ``x_i = sum_j A_m[j, i] F_j`` and ``H'_i = sum_j A_r[j, i] F_j`` (mind the transposes).
Init ``B = 1``, ``A_m = I``, ``A_r = I``: ``x = h`` and ``F <- F + y``, exactly Pre-Norm's
``h + T(norm(h))`` for every m (the tests prove it); m = 1 is the n = 1 hyper-connection.

Dynamic weights (like DHC, spec section 3), per token, with ``Fn = norm(F)`` normalised over each
fraction's c features (parameter-free), zero-initialised ``W_alpha = [W_m | W_r]`` (c, 2m) and
``W_beta`` (c,), and scalar gains ``s_alpha``, ``s_beta`` initialised to 0.01::

    alpha(F) = s_alpha * tanh(Fn W_alpha) + alpha      (m, 2m): row j from fraction j
    B(F)     = s_beta  * tanh(Fn W_beta)  + B          (m,)
    (tanh optional: ``use_tanh``)

Parameters per branch, besides the branch norm (d): static ``m (2m + 1)`` (B, A_m, A_r); dynamic
``m (2m + 1) + c (2m + 1) + 2`` with c = d / m (W_m, W_r, W_beta and the two gains). For m = 1
these are the SHC / DHC counts with n = 1.

Memory: the state is (B, T, d) like Pre-Norm's. With gradients on, the connection runs as two
memory-lean autograd nodes (``_frac_fused``) that keep F once (as Pre-Norm's norm keeps h) and
the branch output y, plus O(m^2) numbers per token for dynamic weights. y is the one d-vector per
branch Pre-Norm does not keep: B's gradient ``sum <g_i, y_i>`` needs it (recovering it as
``(F_new - H') / B`` would be inexact, and undefined where B_i = 0). Under autocast F is kept in
the autocast dtype (as hyper-connections keep H) and y comes in it, so the total equals
Pre-Norm's; in fp32 it is one d-vector per branch more (about +8.5% for a whole d = 256, 6-block
LM step at batch 8 x 256).

Dtypes: as for hyper-connections, the connection is computed in fp32 (fp64 for fp64 state)
whatever the parameter and autocast dtypes; the branch input and the new state come back in the
state's dtype; parameter gradients in the parameter dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.norm import RMSNorm
from ._frac_fused import FracDepth, FracWidth, mix
from .base import Branch, Pathway
from .hyper import DepthContext, _compute_dtype, dynamic_weights, static_and_gain_names


class FracConnection(Pathway):
    """One branch's frac-connection. Use it around any branch of your own model::

        fc = FracConnection(dim=512, frac_rate=4, branch_index=k)
        F = fc.expand(h)                         # (B, T, d) -> (B, T, m, d/m), a view
        F = fc(F, my_branch)                     # or, by hand:
        x, ctx = fc.width_connection(F)          #   x: (B, T, d) branch input (already normed)
        F = fc.depth_connection(ctx, my_branch(x))
        h = fc.reduce(F)                         # (B, T, d)

    Args:
        dim: hidden size d (divisible by ``frac_rate``).
        frac_rate: number of fractions m >= 1.
        branch_index: k, position of the branch in execution order (for reports only: every
            branch starts from the same identity init).
        dynamic: input-dependent weights or static ones.
        use_tanh: tanh on the dynamic projections.
    """

    #: use the memory-lean autograd nodes of ``_frac_fused`` (False: plain autograd)
    fused: bool = True

    def __init__(self, dim: int, frac_rate: int, branch_index: int, *, dynamic: bool = True,
                 use_tanh: bool = True, eps: float = 1e-6):
        super().__init__()
        m = frac_rate
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"frac_rate must be an int >= 1, got {m!r}")
        if dim % m:
            raise ValueError(f"dim={dim} must be divisible by frac_rate={m}")
        self.dim, self.frac_rate, self.frac_dim, self.branch_index = dim, m, dim // m, branch_index
        self.dynamic, self.use_tanh = dynamic, use_tanh
        eye = torch.eye(m)
        self.static_alpha = nn.Parameter(torch.cat([eye, eye], dim=1))  # [A_m | A_r] = [I | I]
        self.static_beta = nn.Parameter(torch.ones(m))  # B = 1
        self.norm = RMSNorm(dim, eps)
        if dynamic:
            c = self.frac_dim
            self.stream_norm = RMSNorm(c, eps, affine=False)  # per fraction, parameter-free
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(c, 2 * m))  # [W_m | W_r]
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(c))  # W_beta
            self.dynamic_alpha_scale = nn.Parameter(torch.full((1,), 0.01))
            self.dynamic_beta_scale = nn.Parameter(torch.full((1,), 0.01))

    # -- state -----------------------------------------------------------------------------------
    def expand(self, h: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, m, d/m)``: the hidden state as m fractions (a view, no copy)."""
        if h.dim() != 3 or h.shape[-1] != self.dim:
            raise ValueError(f"FracConnection.expand expects a hidden state (B, T, d) = (B, T, "
                             f"{self.dim}), got shape {tuple(h.shape)}")
        return h.unflatten(-1, (self.frac_rate, self.frac_dim))

    def reduce(self, h: Tensor) -> Tensor:
        """``(B, T, m, d/m) -> (B, T, d)``: the fractions concatenated (not summed)."""
        self.check_fractions(h, "FracConnection.reduce")
        return h.flatten(-2)

    def check_fractions(self, h: Tensor, where: str = "FracConnection") -> None:
        """One-line ValueError unless ``h`` is ``(B, T, m, d/m)`` fractions of this connection
        (shapes only: nothing is read from the tensor)."""
        m, c = self.frac_rate, self.frac_dim
        if h.dim() == 4 and h.shape[-2] == m and h.shape[-1] == c:
            return
        hint = "; a (B, T, d) hidden state is not fractions: expand it once with expand(h)" if h.dim() == 3 else ""
        raise ValueError(f"{where} expects fractions (B, T, m, d/m) = (B, T, {m}, {c}) made by "
                         f"expand(h), got shape {tuple(h.shape)}{hint}")

    # -- the two halves ---------------------------------------------------------------------------
    def width_connection(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        """``h: (B, T, m, d/m)`` -> branch input ``(B, T, d)`` (normed) and the context for depth."""
        self.check_fractions(h, "width_connection")
        return self._width(h)

    def _width(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        if not (self.fused and torch.is_grad_enabled()):
            return self._width_reference(h)
        device, compute = h.device.type, _compute_dtype(h)
        save_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):  # the weights, cast to the compute dtype
            dyn_wt, s_alpha, s_beta = dynamic_weights(self, compute)  # (2m+1, c)
            stream_eps = self.stream_norm.eps if self.dynamic else 0.0
            x, mixed, beta = FracWidth.apply(
                h, self.static_alpha.to(compute), self.static_beta.to(compute), dyn_wt, s_alpha,
                s_beta, self.norm.weight.to(compute), stream_eps, self.norm.eps, self.use_tanh,
                save_dtype)
        return x, DepthContext(mixed, beta, h.dtype)

    def width_connection_reference(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        """The same computation in plain autograd (reference for tests, and for inference)."""
        self.check_fractions(h, "width_connection_reference")
        return self._width_reference(h)

    def _width_reference(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        alpha, beta = self._connection_weights(h)
        with torch.autocast(h.device.type, enabled=False):
            x, mixed = mix(alpha, h.to(alpha.dtype))  # (B, T, d), (B, T, m, c)
            x = self.norm(x)  # fp32 in, fp32 out
        return x.to(h.dtype), DepthContext(mixed, beta, h.dtype)

    def connection_weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """alpha = ``[A_m | A_r]`` ``(m, 2m)`` or ``(B, T, m, 2m)`` and B ``(m,)`` or ``(B, T, m)``,
        in fp32 (fp64 for fp64 state) whatever the parameter dtype."""
        self.check_fractions(h, "connection_weights")
        return self._connection_weights(h)

    def _connection_weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        compute = _compute_dtype(h)
        alpha, beta = self.static_alpha.to(compute), self.static_beta.to(compute)
        if not self.dynamic:
            return alpha, beta
        with torch.autocast(h.device.type, enabled=False):
            hn = self.stream_norm(h.to(compute))  # (B, T, m, c), each fraction normalised
            a = hn @ self.dynamic_alpha_fn.to(compute)  # (B, T, m, 2m)
            b = hn @ self.dynamic_beta_fn.to(compute)  # (B, T, m)
            if self.use_tanh:
                a, b = a.tanh(), b.tanh()
            return (a * self.dynamic_alpha_scale.to(compute) + alpha,
                    b * self.dynamic_beta_scale.to(compute) + beta)

    def branch_input(self, h: Tensor, alpha: Tensor | None = None) -> Tensor:
        """The branch input before its norm, ``concat(A_m^T F)`` ``(B, T, d)`` in fp32 (fp64 for
        fp64 state); ``alpha`` as :meth:`connection_weights` returns it (computed if None)."""
        self.check_fractions(h, "branch_input")
        if alpha is None:
            alpha = self._connection_weights(h)[0]
        with torch.autocast(h.device.type, enabled=False):
            return mix(alpha, h.to(alpha.dtype))[0]

    def depth_connection(self, ctx: DepthContext, y: Tensor) -> Tensor:
        """``F_i <- H'_i + B_i y_i``: fraction i of the branch output ``y: (B, T, d)``, scaled by
        B_i, added to fraction i. Computed in fp32; returned in the state's dtype."""
        mixed = ctx.mixed
        if y.shape != mixed.shape[:-2] + (self.dim,):
            raise ValueError(f"depth_connection expects the branch output (B, T, d) = "
                             f"{tuple(mixed.shape[:-2] + (self.dim,))}, got shape {tuple(y.shape)}")
        if not (self.fused and torch.is_grad_enabled()):
            return self.depth_connection_reference(ctx, y)
        with torch.autocast(y.device.type, enabled=False):
            return FracDepth.apply(mixed, ctx.beta, y, ctx.dtype)  # (B, T, m, c)

    def depth_connection_reference(self, ctx: DepthContext, y: Tensor) -> Tensor:
        mixed, beta, dtype = ctx.mixed, ctx.beta, ctx.dtype
        with torch.autocast(y.device.type, enabled=False):
            y = y.to(mixed.dtype).unflatten(-1, (self.frac_rate, self.frac_dim))  # (B, T, m, c)
            return (mixed + beta.unsqueeze(-1) * y).to(dtype)

    def forward(self, h: Tensor, branch: Branch) -> Tensor:
        """``h: (B, T, m, d/m)`` fractions -> new fractions, in the same dtype as ``h``."""
        self.check_fractions(h)
        x, ctx = self._width(h)
        return self.depth_connection(ctx, branch(x))

    # -- introspection ---------------------------------------------------------------------------
    def matrix(self) -> Tensor:
        """The static connection matrix ``[[0, B], [A_m, A_r]]`` over fractions, ``(m+1, 2m)``:
        row 0 is ``[0 ... 0, B]``, rows 1..m are ``[A_m | A_r]``."""
        m = self.frac_rate
        out = torch.zeros(m + 1, 2 * m, device=self.static_alpha.device)
        out[0, m:] = self.static_beta.detach()
        out[1:, :] = self.static_alpha.detach()
        return out

    def no_weight_decay(self) -> set[str]:
        """Static connection weights and the dynamic gains are not decayed (as for HC)."""
        return static_and_gain_names(self.dynamic)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return (f"dim={self.dim}, frac_rate={self.frac_rate}, branch={self.branch_index}, {kind}, "
                f"tanh={self.use_tanh}")

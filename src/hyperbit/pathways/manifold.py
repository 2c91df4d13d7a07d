"""Manifold-constrained hyper-connections (mHC, DeepSeek, arXiv 2512.24880): spec section 7.

Per token and per branch, with the state ``H`` of n streams (``(B, T, n, d)``) flattened to
``x in R^{nd}`` and RMS-normalised (no affine) to ``xn``::

    pre  = sigmoid(a_pre  * xn phi_pre  + b_pre)        (n,)   how the branch input reads the streams
    post = 2 sigmoid(a_post * xn phi_post + b_post)     (n,)   how the branch output is written
    res  = DS(a_res * xn phi_res + b_res)               (n, n) doubly stochastic stream mixing
    H   <- res H + post^T T(norm(pre H))

``DS`` is Sinkhorn-Knopp on ``exp(logits)`` (``res="sinkhorn"``: stabilised, fp32, ``sinkhorn_iters``
rounds, then one rounding step that makes it exactly doubly stochastic) or the convex combination
``sum_j softmax(logits)_j P_j`` of the n! permutation matrices (``res="permutations"``, n <= 4),
see :mod:`.sinkhorn`. The projections ``phi`` (packed as one ``(2n + r, nd)`` matrix, ``r = n^2``
or ``n!`` res logits) start at zero; the scalar gates ``a_*`` start at 0.01; there is no tanh.
The pathway owns the branch's RMSNorm, as HC does. In HC's terms: ``A_m = pre``, ``A_r = res^T``,
``B = post`` (:meth:`ManifoldHyperConnection.connection_weights`).

Inits (``init=``); with ``phi = 0`` every stream carries the same vector ``h`` at init, so
``res H = H`` for ANY doubly stochastic ``res``, ``post = 2 sigmoid(0) = 1`` adds the branch
output to every stream once, and the branch reads ``norm(s h)`` with ``s = sum(pre)``. The branch
norm's eps is ``eps * s^2``, so ``rmsnorm(s h; eps s^2) = rmsnorm(h; eps)``: with either init the
LM equals the Pre-Norm LM of the same config to float round-off (the tests prove it).

- ``"residual"`` (default): ``res`` close to the identity with small but live off-diagonal
  entries (:data:`OFF_DIAGONAL` = 0.01 each, diagonal ``1 - (n-1) 0.01``; Sinkhorn bias
  ``c (2I - 1)``, permutations bias ``Delta`` on the identity), and ``pre`` selecting the home
  stream ``k mod n`` (``sigmoid(b_pre)`` = 0.99 there and :data:`PRE_OTHER` = 0.01 elsewhere).
  Once the streams differ, each branch reads mostly its own stream and each stream keeps mostly
  itself, as in HC's Pre-Norm-equivalent init; a sharper identity would freeze the mixing. With
  n = 1 (one stream, ``res = [1]``) the biases are zero, as for ``"paper"``: ``pre = 1/2`` is a
  power of two, so the pathway is Pre-Norm bit for bit.
- ``"paper"``: zero biases: ``pre = 1/2``, ``post = 1``, ``res = 1/n`` everywhere (the published
  behaviour: every branch averages the stream state). With ``phi = 0`` this init treats the n
  streams alike and gradient descent keeps them so, bit for bit (a test shows it): the model
  trains as n identical copies of one residual stream unless something breaks the symmetry.

The first branch of a model reads n copies of the embedding, which every doubly stochastic
``res`` leaves as they are (``res 1 = 1``): its res bias and gate never get a gradient.

Dtypes: as for :class:`~hyperbit.pathways.HyperConnection`, the connection is computed in fp32
(fp64 for fp64 streams) whatever the parameter and autocast dtypes; the branch input and the new
streams come back in the dtype of the streams given.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn.norm import RMSNorm, rms_rstd
from ._hc_fused import WidthConnection, _bmm, _project, kept_for_rebuild, mixes_in_depth
from .base import Branch, Pathway, check_streams, expand_streams, reduce_streams
from .hyper import DepthContext, _take_depth_grad, _take_rebuild, depth_streams, fused_depth
from ._mhc_fused import ManifoldKernelWidth, ManifoldWidth, ProjectStreams, alpha_of, kernels_take
from .sinkhorn import birkhoff, permutation_matrices, sinkhorn

INITS = ("residual", "paper")
RES_MAPS = ("sinkhorn", "permutations")
#: largest n for res="permutations" (n! logits per branch: 24 at n = 4, 120 at n = 5)
MAX_PERMUTATION_STREAMS = 4
#: "residual" init: every off-diagonal entry of res
OFF_DIAGONAL = 0.01
#: "residual" init: pre of the streams other than the home stream (the home stream: 1 - PRE_OTHER)
PRE_OTHER = 0.01
#: initial value of the scalar gates a_pre, a_post, a_res
GATE_INIT = 0.01


class ManifoldHyperConnection(Pathway):
    """One branch's manifold-constrained hyper-connection. Use it around any branch::

        mhc = ManifoldHyperConnection(dim=512, expansion_rate=4, branch_index=k)
        H = mhc(H, my_branch)                    # or, by hand:
        x, ctx = mhc.width_connection(H)         #   x: (B, T, d) branch input (already normed)
        H = mhc.depth_connection(ctx, my_branch(x))

    Args:
        dim: hidden size d.
        expansion_rate: number of streams n >= 1.
        branch_index: k, position of the branch in execution order (home stream ``k mod n``).
        init: ``"residual"`` or ``"paper"`` (module docstring).
        res: ``"sinkhorn"`` or ``"permutations"`` (n <= 4).
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        eps: eps of the stream RMS norm; the branch norm uses ``eps * sum(pre at init)^2``.
    """

    #: the connection weights are computed per token (analysis averages them over tokens)
    dynamic = True
    #: with gradients on, the width connection is a memory-lean autograd node of ``_mhc_fused``
    #: (``ManifoldKernelWidth`` where mHC's one-pass C kernels run, eager or compiled; else
    #: ``ManifoldWidth``, or inside ``torch.compile`` its projection node, the map in plain autograd
    #: and HC's mixing node; False: plain autograd, the reference)
    fused: bool = True

    def __init__(self, dim: int, expansion_rate: int, branch_index: int, *, init: str = "residual",
                 res: str = "sinkhorn", sinkhorn_iters: int = 20, eps: float = 1e-6):
        super().__init__()
        n = expansion_rate
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"expansion_rate must be an int >= 1, got {n!r}")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not allowed; choose one of {list(INITS)}")
        if res not in RES_MAPS:
            raise ValueError(f"res={res!r} is not allowed; choose one of {list(RES_MAPS)}")
        if res == "permutations" and n > MAX_PERMUTATION_STREAMS:
            raise ValueError(f"res='permutations' needs expansion_rate <= {MAX_PERMUTATION_STREAMS} "
                             f"(n! logits per branch), got {n}; use res='sinkhorn'")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        self.dim, self.expansion_rate, self.branch_index = dim, n, branch_index
        self.init, self.res, self.sinkhorn_iters, self.stream_eps = init, res, sinkhorn_iters, eps
        if res == "permutations":
            self.register_buffer("perms", permutation_matrices(n), persistent=False)  # (n!, n, n)
        n_res = n * n if res == "sinkhorn" else math.factorial(n)
        b_pre, b_res = _init_biases(n, branch_index, init, res)
        # rows of phi: [pre (n) | post (n) | res (n_res)], each a projection from the nd flat state
        self.phi = nn.Parameter(torch.zeros(2 * n + n_res, n * dim))
        self.bias_pre = nn.Parameter(b_pre)
        self.bias_post = nn.Parameter(torch.zeros(n))
        self.bias_res = nn.Parameter(b_res)
        self.gate_pre = nn.Parameter(torch.full((1,), GATE_INIT))
        self.gate_post = nn.Parameter(torch.full((1,), GATE_INIT))
        self.gate_res = nn.Parameter(torch.full((1,), GATE_INIT))
        # The branch reads norm(pre H) = norm(s h) at init (s = sum(pre)); eps * s^2 makes that
        # rmsnorm(h; eps) exactly, as the Pre-Norm branch norm computes it.
        s0 = _pre_sum_at_init(n, init)
        self.norm = RMSNorm(dim, eps * s0 * s0)

    # -- the connection weights -------------------------------------------------------------------
    def _weights(self, hc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``hc: (B, T, n, d)`` in the compute dtype -> pre ``(B, T, n)``, post ``(B, T, n)``, res
        ``(B, T, n, n)``, in the compute dtype (call with autocast off)."""
        compute = hc.dtype
        x = hc.flatten(-2)  # (B, T, nd): the flattened streams
        z = _project(x, self.phi.to(compute)) * rms_rstd(x, self.stream_eps)  # norm(x) phi: (B, T, m)
        return self._map(z, *self._small(compute))

    def _small(self, compute: torch.dtype) -> tuple[Tensor, ...]:
        """The biases and gates, in the compute dtype, in :meth:`_map`'s order."""
        return tuple(p.to(compute) for p in (self.bias_pre, self.bias_post, self.bias_res,
                                             self.gate_pre, self.gate_post, self.gate_res))

    def _map(self, z: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor, a_pre: Tensor,
             a_post: Tensor, a_res: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The per-token map from the projections ``z`` ``(B, T, 2n + r)`` to pre, post and res."""
        n = self.expansion_rate
        z_pre, z_post, z_res = z[..., :n], z[..., n:2 * n], z[..., 2 * n:]
        pre = torch.sigmoid(a_pre * z_pre + b_pre)
        post = 2 * torch.sigmoid(a_post * z_post + b_post)
        logits = a_res * z_res + b_res  # (B, T, r)
        if self.res == "permutations":
            return pre, post, birkhoff(logits, self.perms)
        logits = logits.unflatten(-1, (n, n))
        return pre, post, sinkhorn(logits, self.sinkhorn_iters)

    def mhc_weights(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """pre ``(B, T, n)``, post ``(B, T, n)`` and res ``(B, T, n, n)`` for the streams ``h``, in
        fp32 (fp64 for fp64 streams)."""
        self.check_streams(h, "mhc_weights")
        with torch.autocast(h.device.type, enabled=False):
            return self._weights(h.to(_compute_dtype(h)))

    def connection_weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The weights in :class:`~hyperbit.pathways.HyperConnection`'s form, for the analyses:
        alpha ``(B, T, n, n+1)`` = ``[A_m | A_r]`` = ``[pre | res^T]`` and beta ``(B, T, n)`` =
        post, in fp32 (fp64 for fp64 streams)."""
        pre, post, res = self.mhc_weights(h)
        return torch.cat([pre.unsqueeze(-1), res.transpose(-1, -2)], dim=-1), post

    # -- the two halves ---------------------------------------------------------------------------
    def width_connection(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        """``h: (B, T, n, d)`` -> branch input ``norm(pre H)`` ``(B, T, d)`` in the dtype of ``h``,
        and the context (``res H`` and post, in fp32) for :meth:`depth_connection`."""
        self.check_streams(h, "width_connection")
        return self._width(h)

    def _width(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        if not (self.fused and torch.is_grad_enabled()):
            return self._width_reference(h)
        device, compute = h.device.type, _compute_dtype(h)
        save_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        compiling = torch.compiler.is_compiling()
        with torch.autocast(device, enabled=False):
            phi, small, norm_w = self.phi.to(compute), self._small(compute), self.norm.weight.to(compute)
            one_pass = kernels_take(h, phi, save_dtype, self.res)
            if compiling and not one_pass:
                return self._width_split(h, compute, save_dtype)
            source, lazy = _take_rebuild(h), mixes_in_depth(h, compute, save_dtype)
            depth_grad = None if compiling else _take_depth_grad(h)
            if one_pass:
                x, mixed, post, saved, alpha = ManifoldKernelWidth.apply(
                    h, phi, self.stream_eps, torch.cat(small[:3]), torch.cat(small[3:]), norm_w, self.norm.eps,
                    self.sinkhorn_iters, save_dtype, source, source is None, lazy, depth_grad)
            else:
                x, mixed, post, saved, alpha = ManifoldWidth.apply(
                    h, phi, self.stream_eps, self._map, *small, norm_w, self.norm.eps, save_dtype, source,
                    source is None, lazy, depth_grad)
        kept = None if source is not None else kept_for_rebuild(saved, alpha, h)
        return x, DepthContext(mixed, post, h.dtype, kept, depth_streams(lazy, h, alpha, alpha))

    def _width_split(self, h: Tensor, compute: torch.dtype, save_dtype: torch.dtype) -> tuple[Tensor, DepthContext]:
        """The fused width connection as three nodes, the form inside ``torch.compile``: the
        projection (``_mhc_fused.ProjectStreams``, which makes the one copy of the streams both
        nodes keep), the per-token map in plain autograd, and HC's mixing node with per-token
        weights (pre and res as alpha, post as beta)."""
        with torch.autocast(h.device.type, enabled=False):
            source, lazy = _take_rebuild(h), mixes_in_depth(h, compute, save_dtype)
            z, saved = ProjectStreams.apply(h, self.phi.to(compute), self.stream_eps, save_dtype, source)
            pre, post, res = self._map(z, *self._small(compute))
            alpha = alpha_of(pre, res)
            x, mixed, post, _, _ = WidthConnection.apply(
                h, alpha, post, None, None, None, self.norm.weight.to(compute), 0.0, self.norm.eps, False,
                save_dtype, source, False, lazy, saved)
        kept = None if source is not None else kept_for_rebuild(saved, alpha.detach(), h)
        return x, DepthContext(mixed, post, h.dtype, kept, depth_streams(lazy, h, None, alpha))

    def width_connection_reference(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        """The same computation in plain autograd (the reference for tests, and for inference)."""
        self.check_streams(h, "width_connection_reference")
        return self._width_reference(h)

    def _width_reference(self, h: Tensor) -> tuple[Tensor, DepthContext]:
        with torch.autocast(h.device.type, enabled=False):
            # (B, T, n, d), contiguous: expand_streams' broadcast view would slow the products
            hc = h.to(_compute_dtype(h), memory_format=torch.contiguous_format)
            pre, post, res = self._weights(hc)
            # one product for both reads (a product with a size-1 dim is slow on CPU)
            mix = _bmm(torch.cat([pre.unsqueeze(-2), res], dim=-2), hc)  # (B, T, 1+n, d)
            x, mixed = mix[..., 0, :], mix[..., 1:, :]  # pre H: (B, T, d); res H: (B, T, n, d)
            x = self.norm(x)  # fp32 in, fp32 out
        return x.to(h.dtype), DepthContext(mixed, post, h.dtype)

    def depth_connection(self, ctx: DepthContext, y: Tensor) -> Tensor:
        """``res H + post^T y``: the branch output ``y: (B, T, d)`` added to every stream, scaled
        by post; computed in fp32 and returned in the dtype of the streams given to width."""
        mixed, post, dtype = ctx.mix, ctx.beta, ctx.dtype
        if y.shape != mixed.shape[:-2] + mixed.shape[-1:]:
            raise ValueError(f"depth_connection expects the branch output (B, T, d) = "
                             f"{tuple(mixed.shape[:-2] + mixed.shape[-1:])}, got shape {tuple(y.shape)}")
        if torch.is_grad_enabled():  # keeps y and post for backward, nothing of size n*d
            return fused_depth(self, ctx, y)
        with torch.autocast(y.device.type, enabled=False):
            mixed = ctx.mixed  # (the placeholder's value, if the width node left the mixing here)
            return (mixed + post.unsqueeze(-1) * y.to(mixed.dtype).unsqueeze(-2)).to(dtype)

    def forward(self, h: Tensor, branch: Branch) -> Tensor:
        """``h: (B, T, n, d)`` streams -> new streams, in the same dtype as ``h``."""
        self.check_streams(h)
        x, ctx = self._width(h)
        return self.depth_connection(ctx, branch(x))

    def check_streams(self, h: Tensor, where: str = "ManifoldHyperConnection") -> None:
        check_streams(h, self.expansion_rate, self.dim, where=where)

    def expand(self, h: Tensor) -> Tensor:
        """``(B, T, d) -> (B, T, n, d)``: n identical streams."""
        return expand_streams(h, self.expansion_rate)

    def reduce(self, h: Tensor) -> Tensor:
        """``(B, T, n, d) -> (B, T, d)``: the sum of the streams."""
        return reduce_streams(h, self.expansion_rate)

    # -- training and introspection ---------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Static biases and gates are not decayed; the projections phi are (spec sections 2, 7)."""
        return {"bias_pre", "bias_post", "bias_res", "gate_pre", "gate_post", "gate_res"}

    def extra_repr(self) -> str:
        iters = f", iters={self.sinkhorn_iters}" if self.res == "sinkhorn" else ""
        return (f"dim={self.dim}, expansion_rate={self.expansion_rate}, branch={self.branch_index}, "
                f"init={self.init}, res={self.res}{iters}")


def _compute_dtype(h: Tensor) -> torch.dtype:
    return torch.promote_types(h.dtype, torch.float32)


def _pre_sum_at_init(n: int, init: str) -> float:
    """``sum(pre)`` at init (computed without tensors: the module may be built on the meta device)."""
    if init == "paper" or n == 1:
        return n / 2
    return (1 - PRE_OTHER) + (n - 1) * PRE_OTHER


def _init_biases(n: int, branch_index: int, init: str, res: str) -> tuple[Tensor, Tensor]:
    """b_pre ``(n,)`` and b_res (``(n*n,)`` Sinkhorn logits or ``(n!,)`` permutation logits)."""
    n_res = n * n if res == "sinkhorn" else math.factorial(n)
    if init == "paper":
        return torch.zeros(n), torch.zeros(n_res)
    if n == 1:  # one stream: pre only sets the eps scale (1/2 is exact); res is [1] whatever its logit
        return torch.zeros(n), torch.zeros(n_res)
    b_pre = torch.full((n,), math.log(PRE_OTHER / (1 - PRE_OTHER)))  # sigmoid = PRE_OTHER
    b_pre[branch_index % n] = math.log((1 - PRE_OTHER) / PRE_OTHER)  # sigmoid = 1 - PRE_OTHER
    diagonal = 1 - (n - 1) * OFF_DIAGONAL
    if res == "sinkhorn":
        # exp(c (2I - 1)) has equal row and column sums, so Sinkhorn returns it row-normalised:
        # diagonal / off-diagonal = exp(2c)
        c = 0.5 * math.log(diagonal / OFF_DIAGONAL)
        return b_pre, (c * (2 * torch.eye(n) - 1)).flatten()
    # weight w on the identity, (1 - w) / (n! - 1) on each other permutation; (n-1)! of those
    # put a 1 at any given off-diagonal entry, so OFF_DIAGONAL = (n-1)! (1 - w) / (n! - 1)
    k = math.factorial(n)
    rest = OFF_DIAGONAL * (k - 1) / math.factorial(n - 1)  # 1 - w
    b_res = torch.zeros(k)
    b_res[0] = math.log((1 - rest) * (k - 1) / rest)  # perms[0] is the identity
    return b_pre, b_res

"""Doubly stochastic matrices from unconstrained logits: the stream mixing of mHC (spec section 7).

Two maps from logits to an ``(n, n)`` matrix with non-negative entries whose rows and columns
each sum to 1 (a convex combination of permutations, so a product of any number of them never
amplifies a signal: the largest absolute row sum of the product stays 1):

- :func:`sinkhorn` - Sinkhorn-Knopp on ``exp(logits)``: ``iters`` rounds of row then column
  normalisation, in fp32 (fp64 for fp64 logits), as a matrix scaling of ``exp(logits)`` shifted
  by each row's max and floored at ``exp(-40)`` (finite for any logits), followed by one rounding
  step onto the doubly stochastic matrices (Altschuler, Weed & Rigollet, NeurIPS 2017, Alg. 2).
  Sinkhorn alone converges slowly when the logits span a wide range (with logits of std 3, 20
  iterations leave a third of random 4 x 4 matrices with a row sum more than 1e-3 off); the rounding
  makes every result exactly doubly stochastic (to round-off) and, where Sinkhorn has converged,
  changes it by no more than its remaining error. Extreme logits (+-1e4) give finite values and
  gradients.
- :func:`birkhoff` - ``sum_j softmax(logits)_j P_j`` over the ``n!`` permutation matrices ``P_j``:
  exactly doubly stochastic, no iterations, sensible for n <= 4 (24 logits).

Memory and speed: the Sinkhorn iterations are one autograd node that keeps only its input logits
and redoes the iterations in backward, so ``iters`` rounds do not keep ``2 * iters`` intermediate
``(n, n)`` tensors per token alive until backward. On CPU (n <= 8, fp32 / fp64) the node's forward
and backward are each one call of a C kernel (``hyperbit/nn/native.c``: every round of a token in
registers, instead of ~4 tensor ops per round forward and ~3x that backward, each a dispatch and a
pass over memory), also inside ``torch.compile`` (as a ``torch.library`` op). Elsewhere, or
without a C compiler, the backward recomputes the rounds under autograd; and inside
``torch.compile`` they are plain autograd there (the node's backward would split the graph), with
Inductor choosing what to save or recompute.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..nn import native

#: the rounding step divides by the total row deficit; below this floor the correction it adds
#: (at most the deficit itself) is negligible, and the floor keeps its gradient bounded
_DEFICIT_FLOOR = 1e-6
#: logits more than this below their row's largest count as this far below it. exp(-40) = 4e-18
#: keeps every sum and scaling of the iteration finite in fp32. Rows whose logits span less than
#: 40 are not affected at all (the mHC inits span 4.6); DeepSeek-V4's production mHC floors far
#: higher (a row softmax plus 1e-6).
LOGIT_RANGE = 40.0


def _sinkhorn_reference(logits: Tensor, iters: int) -> Tensor:
    """Plain autograd: ``(..., n, n)`` logits -> doubly stochastic ``(..., n, n)``, in the logits'
    dtype (the caller chooses fp32 or fp64).

    Sinkhorn-Knopp as a matrix scaling: ``K = exp(logits)``, row sums ``r`` and column sums ``c``
    (``r_i = sum_j K_ij / c_j``, then ``c_j = sum_i K_ij / r_i``), result ``K_ij / (r_i c_j)``.
    These are the iterates of the log-domain form (rows, then columns normalised in turn) to
    round-off, in 4 tensor ops per round instead of 14 (forward and backward in 0.67x the time of
    the log-domain form on CPU, ``benchmarks/sinkhorn.py``). Each
    row of logits is first shifted by its max (a row scaling, which the first row normalisation
    undoes exactly) and floored at ``-``:data:`LOGIT_RANGE`: every entry of ``K`` then lies in
    ``[exp(-LOGIT_RANGE), 1]``, and every sum is positive and finite for any finite logits. Only
    for logits spread over more than ``LOGIT_RANGE`` within a row does the result differ from the
    log-domain form (the floor keeps a whole column of tiny entries from vanishing).

    Computed with the tokens last, ``(n, n, N)``: every reduction then adds whole contiguous token
    vectors (on CPU a reduction over a last dim of size n is ~10x slower)."""
    lead, n = logits.shape[:-2], logits.shape[-1]
    z = logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()  # (n, n, N): z[i, j, token]
    res = round_doubly_stochastic(_scale(z, iters), dims=(0, 1))  # (n, n, N)
    return res.permute(2, 0, 1).reshape(*lead, n, n)


def _scale(z: Tensor, iters: int) -> Tensor:
    """The Sinkhorn iterate after ``iters`` rounds (its columns sum to 1), for logits ``z`` laid
    out ``(n, n, N)``: rows ``z[:, :, t]``' first index."""
    # the row shift is a constant for the result (no gradient needed through the max)
    k = (z - z.detach().amax(1, keepdim=True)).clamp_min(-LOGIT_RANGE).exp()
    c = None
    for _ in range(iters):
        r = (k if c is None else k / c).sum(1, keepdim=True)  # (n, 1, N) row sums
        c = (k / r).sum(0, keepdim=True)  # (1, n, N) column sums of the row-normalised matrix
    return k / r / c


def round_doubly_stochastic(m: Tensor, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Round a non-negative matrix with column sums 1 (the last Sinkhorn half-step) onto the
    doubly stochastic matrices: rows that sum to more than 1 are scaled down to 1, and the mass
    this frees in each column goes to the rows that sum to less than 1, in proportion to their
    deficit. Entries stay non-negative; rows and columns then sum to 1 exactly (to round-off).
    ``dims``: the row and the column index of ``m`` (``(-2, -1)`` for ``(..., n, n)``)."""
    row, col = dims
    scaled = m / m.sum(col, keepdim=True).clamp_min(1.0)  # every row sum <= 1
    deficit = (1 - scaled.sum(col, keepdim=True)).clamp_min(0)  # what each row lacks
    spare = (1 - scaled.sum(row, keepdim=True)).clamp_min(0)  # what each column lacks
    total = deficit.sum(row, keepdim=True).clamp_min(_DEFICIT_FLOOR)
    return scaled + deficit * spare / total


def _native_ok(logits: Tensor) -> bool:
    """The CPU kernel takes these logits (also inside ``torch.compile``, as a custom op)."""
    return logits.shape[-1] <= native.SINKHORN_MAX_N and native.takes(logits)


def _kernel(logits: Tensor, iters: int) -> Tensor:
    n = logits.shape[-1]
    return native.sinkhorn(logits.reshape(-1, n, n), iters, LOGIT_RANGE, _DEFICIT_FLOOR).view(logits.shape)


def _kernel_backward(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    n = logits.shape[-1]
    return native.sinkhorn_backward(logits.reshape(-1, n, n), grad.reshape(-1, n, n), iters,
                                    LOGIT_RANGE, _DEFICIT_FLOOR).view(logits.shape)


@torch.library.custom_op("hyperbit::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: Tensor, iters: int) -> Tensor:
    """The CPU kernel as an operator: one call forward, one backward (saving only the logits), and
    opaque to ``torch.compile`` (no unrolled rounds in the graph, no graph break)."""
    return _kernel(logits, iters)


@_sinkhorn_op.register_fake
def _(logits: Tensor, iters: int) -> Tensor:
    return logits.new_empty(logits.shape)  # contiguous, as the kernel writes it


@torch.library.custom_op("hyperbit::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    return _kernel_backward(logits, grad, iters)


@_sinkhorn_backward_op.register_fake
def _(logits: Tensor, grad: Tensor, iters: int) -> Tensor:
    return logits.new_empty(logits.shape)  # contiguous, as the kernel writes it


def _op_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.iters = inputs[1]


def _op_backward(ctx, grad: Tensor):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward_op(logits, grad, ctx.iters), None


_sinkhorn_op.register_autograd(_op_backward, setup_context=_op_setup)


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp that keeps only its input logits: with ``kernel``, one call of the CPU kernel
    each way (the eager form of :func:`_sinkhorn_op`, without the operator's dispatch: measured 12%
    less time forward and backward at 2,048 tokens, n = 4); else the PyTorch iteration, its rounds
    recomputed under autograd in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int, kernel: bool) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.iters, ctx.kernel = iters, kernel
        return _kernel(logits, iters) if kernel else _sinkhorn_reference(logits, iters)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        if ctx.kernel:
            return _kernel_backward(logits, grad, ctx.iters), None, None
        with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
            z = logits.detach().requires_grad_(True)
            (g_logits,) = torch.autograd.grad(_sinkhorn_reference(z, ctx.iters), z, grad)
        return g_logits, None, None


def sinkhorn(logits: Tensor, iters: int = 20, *, recompute: bool = True) -> Tensor:
    """``(..., n, n)`` logits -> a doubly stochastic matrix ``(..., n, n)`` (Sinkhorn-Knopp on
    ``exp(logits)``, then the rounding step), computed in fp32 (fp64 for fp64 logits) and returned
    in that dtype.

    On CPU (fp32 / fp64, n <= 8) this is one call of the C kernel forward and one backward (inside
    ``torch.compile`` as the operator ``hyperbit::sinkhorn``). Elsewhere: ``recompute=True`` keeps
    only the logits for backward and recomputes the rounds there; ``recompute=False`` (for callers
    that are themselves recomputing under autograd, as a fused node's backward) is plain autograd
    through the rounds."""
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects square (..., n, n) logits, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    with torch.autocast(logits.device.type, enabled=False):
        if _native_ok(logits):
            if torch.compiler.is_compiling():
                return _sinkhorn_op(logits, iters)
            return _Sinkhorn.apply(logits, iters, True)
        # compiled, plain autograd: the graph stays whole and Inductor decides what to keep
        if torch.is_grad_enabled() and logits.requires_grad and not torch.compiler.is_compiling():
            return _Sinkhorn.apply(logits, iters, False) if recompute else _sinkhorn_reference(logits, iters)
        return _sinkhorn_reference(logits, iters)


def permutation_matrices(n: int) -> Tensor:
    """The ``n!`` permutation matrices ``(n!, n, n)``, the identity first (``P_j[i, s(i)] = 1``)."""
    # built from Python lists: no data-dependent op, so it works on any default device (meta too)
    return torch.tensor([[[1.0 if s[i] == j else 0.0 for j in range(n)] for i in range(n)]
                         for s in itertools.permutations(range(n))])


def birkhoff(logits: Tensor, perms: Tensor) -> Tensor:
    """``(..., n!)`` logits -> ``sum_j softmax(logits)_j P_j`` ``(..., n, n)`` over the permutation
    matrices ``perms`` ``(n!, n, n)``, in fp32 (fp64 for fp64 logits)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    k, n = perms.shape[0], perms.shape[-1]
    if logits.shape[-1] != k:
        raise ValueError(f"birkhoff expects {k} logits (one per permutation), got shape {tuple(logits.shape)}")
    with torch.autocast(logits.device.type, enabled=False):
        weights = logits.to(compute).softmax(dim=-1)  # (..., n!)
        return (weights @ perms.to(compute).reshape(k, n * n)).unflatten(-1, (n, n))

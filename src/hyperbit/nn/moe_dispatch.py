"""The dispatch of :mod:`hyperbit.nn.moe`: token-expert assignments grouped into rows by expert,
the per-expert matmuls over those rows, and the two gathers that move rows in and out.

Every expert's row count is bucketed (:func:`bucket_rows`) so that matmul shapes recur from step to
step; the padding rows read a copy of token 0 with combine weight 0, so they add exactly zero to
every output and gradient (the tests compare with a per-token loop in fp64). The gathers' backward
passes are gathers too, never a scatter-add: deterministic on every device.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64: the dtype routing is computed in."""
    return torch.promote_types(dtype, torch.float32)


# -- rows grouped by expert: the matmuls and the two gathers ------------------------------------------
def bucket_rows(rows: int) -> int:
    """``rows`` rounded up to 4 significant bits: below 16 unchanged, then multiples of 2 (below
    32), of 4 (below 64), ...: at most 1/8 more, 8 sizes per octave. An expert's row count, so that
    matmul shapes recur from step to step (oneDNN compiles a kernel per shape: module docstring)."""
    step = 1 << max(rows.bit_length() - 4, 0)
    return -(-rows // step) * step


def _with_zero_row(t: Tensor) -> Tensor:
    """``t`` with one zero row appended: the row that a dropped assignment reads."""
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


def _sum_over_k(parts: Tensor) -> Tensor:
    """``parts (k, N, d)`` summed over k in fp32 and rounded once to their dtype, as
    ``parts.sum(0, dtype=fp32).to(parts.dtype)`` but as elementwise adds (faster on CPU than a
    reduction over the outer dim); for k <= 2 the dtype's own add is already exactly that."""
    acc = parts[0] if parts.shape[0] <= 2 else parts[0].to(_wide(parts.dtype))
    for part in parts[1:]:
        acc = acc + part
    return acc.to(parts.dtype)


class _GroupedMatmul(torch.autograd.Function):
    """``x (M, in)``, rows grouped by expert (``sizes``: E row counts summing to M), times every
    group's own expert -> ``(M, out)``: group e times ``w[e].T``, where ``w (E, out, in)`` is the
    ``weights`` concatenated along out, cast to x's dtype (the autocast cast) once per call.

    One ``torch.mm`` per expert, written in place; backward likewise: ``grad_x`` group by group and
    ``grad_w[e] = grad_e.T @ x_e`` (zeros for an empty group), returned split per weight in its
    own dtype. Concatenated weights (gate and up) share one matmul per expert."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], *weights: Tensor) -> Tensor:
        w = x.new_empty(weights[0].shape[0], sum(v.shape[1] for v in weights), x.shape[1])
        for part, v in zip(w.split([v.shape[1] for v in weights], dim=1), weights):
            part.copy_(v)
        out = x.new_empty(x.shape[0], w.shape[1])
        for w_e, x_e, out_e in zip(w, x.split(sizes), out.split(sizes)):
            torch.mm(x_e, w_e.t(), out=out_e)
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        ctx.widths, ctx.dtypes = [v.shape[1] for v in weights], [v.dtype for v in weights]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grads, xs = grad.split(ctx.sizes), x.split(ctx.sizes)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for w_e, grad_e, out_e in zip(w, grads, grad_x.split(ctx.sizes)):
                torch.mm(grad_e, w_e, out=out_e)
        grad_w = torch.empty_like(w)
        for grad_w_e, grad_e, x_e in zip(grad_w, grads, xs):
            torch.mm(grad_e.t(), x_e, out=grad_w_e)
        parts = grad_w.split(ctx.widths, dim=1)
        return grad_x, None, *(part.to(dtype) for part, dtype in zip(parts, ctx.dtypes))


class DispatchPlan(NamedTuple):
    """Where the k*N assignments (choice-major: assignment ``j * N + n`` is token n's j-th choice)
    go in the rows grouped by expert (:func:`dispatch_plan`)."""

    sizes: list[int]  # rows of every expert, bucketed (bucket_rows) or cap each (static); M = sum(sizes)
    row_assignment: Tensor  # (M,) the assignment every row holds; k*N for a padding row
    row: Tensor  # (k*N,) the row of every assignment; M for a dropped one
    load: Tensor  # (E,) assignments routed to every expert, before capacity
    dropped: Tensor  # () the number of dropped assignments


def dispatch_plan(experts: Tensor, num_experts: int, cap: int | None = None, static: bool = False) -> DispatchPlan:
    """The rows of ``experts (N, k)``'s assignments: grouped by expert (expert 0's rows first), in
    priority order inside an expert (all first choices before any second choice, tokens in order
    within a choice rank: a stable sort of the choice-major list), then the expert's padding rows.
    With a capacity ``cap`` an expert keeps its first ``cap`` assignments and drops the rest.

    The row counts are read on the host (one sync), then bucketed (:func:`bucket_rows`), except
    with a capacity and ``static``: then every expert gets ``cap`` rows, padding included, and the
    plan needs no value from the device (the form for GPUs, where a sync per layer stalls the
    stream; it computes up to ``cap * E - N * k`` padding rows more)."""
    flat = experts.t().reshape(-1)  # (k*N,) choice-major
    load = torch.bincount(flat, minlength=num_experts)  # (E,)
    order = torch.argsort(flat, stable=True)  # grouped by expert, priority order kept
    ranked = flat[order]  # the expert of every sorted assignment
    rank = torch.arange(flat.numel(), device=flat.device) - (load.cumsum(0) - load)[ranked]
    kept = load if cap is None else load.clamp(max=cap)
    if cap is not None and static:
        sizes = [cap] * num_experts
    else:
        sizes = [bucket_rows(rows) for rows in kept.tolist()]  # the host sync
    starts = torch.tensor([0, *itertools.accumulate(sizes[:-1])], device=flat.device)
    rows = sum(sizes)
    row_of_sorted = starts[ranked] + rank
    if cap is not None:
        row_of_sorted = torch.where(rank < cap, row_of_sorted, rows)  # dropped: one past the end
    # one spare slot for the dropped ones to land in, cut off
    row_assignment = flat.new_full((rows + 1,), flat.numel()).scatter_(0, row_of_sorted, order)[:rows]
    row = torch.empty_like(order).scatter_(0, order, row_of_sorted)
    return DispatchPlan(sizes, row_assignment, row, load, (load - kept).sum())


class _Dispatch(torch.autograd.Function):
    """``x (N, d)`` -> its rows grouped by expert ``x[row_token]`` ``(M, d)``; backward: every
    assignment's gradient row gathered back (``row``; a dropped one reads a zero row) and summed
    over the token's k assignments."""

    @staticmethod
    def forward(ctx, x: Tensor, row_token: Tensor, row: Tensor, k: int, dropping: bool) -> Tensor:
        ctx.save_for_backward(row)
        ctx.k, ctx.dropping = k, dropping
        return x.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (row,) = ctx.saved_tensors
        rows = (_with_zero_row(grad) if ctx.dropping else grad).index_select(0, row)
        return _sum_over_k(rows.view(ctx.k, -1, grad.shape[1])), None, None, None, None


class _Combine(torch.autograd.Function):
    """The expert outputs ``y (M, d)`` -> every token's ``sum_j w_j * y[row of its j-th assignment]``
    ``(N, d)``: each row scaled by its combine weight (``weights (k*N,)`` choice-major, cast to y's
    dtype; a padding row's weight is 0), gathered to its assignment (a dropped one reads a zero row)
    and summed over k in fp32. Backward: every row's gradient is its token's gradient times its
    weight (gathered, not scattered), and every weight's is ``<grad of its token, its row>``."""

    @staticmethod
    def forward(ctx, y: Tensor, weights: Tensor, row_assignment: Tensor, row_token: Tensor, row: Tensor,
                k: int, dropping: bool) -> Tensor:
        row_weight = _with_zero_row(weights.unsqueeze(-1)).index_select(0, row_assignment).to(y.dtype)
        scaled = y * row_weight  # (M, d)
        per_assignment = (_with_zero_row(scaled) if dropping else scaled).index_select(0, row)
        ctx.save_for_backward(y, row_weight, row_token, row)
        ctx.dropping, ctx.weight_dtype = dropping, weights.dtype
        return _sum_over_k(per_assignment.view(k, -1, y.shape[1]))

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, row_weight, row_token, row = ctx.saved_tensors
        grad_rows = grad.index_select(0, row_token)  # (M, d) the token's gradient, on each of its rows
        grad_weight_rows = (grad_rows * y).sum(-1)  # (M,)
        if ctx.dropping:
            grad_weight_rows = _with_zero_row(grad_weight_rows)
        grad_weights = grad_weight_rows.index_select(0, row).to(ctx.weight_dtype)
        return grad_rows * row_weight, grad_weights, None, None, None, None, None



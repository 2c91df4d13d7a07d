"""Cross-entropy over the vocabulary without an fp32 copy of the logits.

``F.cross_entropy(logits.float(), targets)`` materialises the logits in fp32 twice: the cast, then
the log-softmax it keeps for backward (and a third full-size fp32 tensor, its gradient). Here the
forward keeps only the logits (already alive: the model returns them) and one fp32 log-sum-exp per
row, and both passes work through the rows in chunks, so no fp32 tensor larger than one chunk ever
exists. The value is ``F.cross_entropy``'s to round-off: the log-sum-exp is accumulated in fp32
(fp64 for fp64 logits) whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # fp32 elements per chunk of rows (64 MiB)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``logits: (N, V)`` (any float dtype) against ``targets: (N,)``;
    rows whose target is ``ignore_index`` count neither in the sum nor in the mean (all of them
    ignored: NaN, as ``F.cross_entropy``). Under ``torch.compile`` the plain formula (which the
    compiler fuses itself)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy takes logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if torch.compiler.is_compiling():
        compute = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.to(compute), targets, ignore_index=ignore_index)
    return _CrossEntropy.apply(logits, targets, ignore_index)


def _chunks(n_rows: int, n_cols: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    return [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        valid = targets != ignore_index  # (N,)
        safe = targets.masked_fill(~valid, 0)  # (N,) ignored rows read column 0, weighted 0
        lse = torch.empty(logits.shape[0], dtype=compute, device=logits.device)  # (N,)
        for rows in _chunks(*logits.shape):
            lse[rows] = torch.logsumexp(logits[rows].to(compute), dim=-1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).to(compute)  # (N,) target logits
        count = valid.sum()
        ctx.save_for_backward(logits, safe, lse, valid.to(compute) / count)  # (N,): 1/count or 0
        return (lse - picked).masked_fill_(~valid, 0).sum() / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, safe, lse, weight = ctx.saved_tensors
        # d loss / d logits = weight * (softmax(logits) - onehot(target)), row by row
        scale = (weight * grad).unsqueeze(1)  # (N, 1)
        out = None
        chunks = _chunks(*logits.shape)
        for rows in chunks:
            p = (logits[rows].to(lse.dtype) - lse[rows].unsqueeze(1)).exp_()  # softmax, (n, V)
            p.scatter_add_(1, safe[rows].unsqueeze(1), p.new_full((p.shape[0], 1), -1.0))
            p.mul_(scale[rows])
            if len(chunks) == 1:
                return p.to(logits.dtype), None, None
            if out is None:
                out = torch.empty_like(logits)
            out[rows] = p
        if out is None:  # no rows at all
            out = torch.zeros_like(logits)
        return out, None, None

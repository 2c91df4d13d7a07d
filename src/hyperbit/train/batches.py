"""Which rows of a step's global batch each process reads.

The global batch of step ``s`` is ``TokenShards.get_batch(s, batch_size, seq_len, seed)``:
``batch_size`` windows at offsets that depend only on ``(seed, s)``. It is cut into ``grad_accum``
micro-batches of ``micro = batch_size / grad_accum`` rows, and each micro-batch into
``world_size`` equal slices, one per rank::

    micro-batch m, rank r:   rows [m * micro + r * per_rank, m * micro + (r + 1) * per_rank)

A process reads only the windows of its own rows (the offsets of the whole batch are a few
random numbers; the tokens are read from the memory-mapped shards row by row), and copies them
to its device once per step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import TokenShards
from ..data.digits import ImageSet


def rank_rows(batch_size: int, grad_accum: int, rank: int, world_size: int) -> list[list[int]]:
    """The global-batch rows of each of the step's micro-batches that ``rank`` computes."""
    micro = batch_size // grad_accum
    per_rank = micro // world_size
    return [list(range(m * micro + rank * per_rank, m * micro + (rank + 1) * per_rank))
            for m in range(grad_accum)]


def rank_batch(data: TokenShards | ImageSet, step: int, batch_size: int, seq_len: int, seed: int, grad_accum: int,
               rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``, each ``(grad_accum, per_rank, seq_len)`` int64: this rank's rows of every
    micro-batch of the step's global batch (``x[m]`` is micro-batch ``m``), on the CPU. Equal to
    the matching rows of ``data.get_batch(step, batch_size, seq_len, seed)``."""
    rows = rank_rows(batch_size, grad_accum, rank, world_size)
    if isinstance(data, ImageSet):  # images (grad_accum, per_rank, C, H, W) and labels
        order = data.batch_rows(step, batch_size, seed)
        idx = torch.stack([order[i] for micro in rows for i in micro])
        shape = (grad_accum, len(rows[0]))
        return (data.images[idx].view(*shape, *data.images.shape[1:]).contiguous(),
                data.labels[idx].view(shape).contiguous())
    starts = data.batch_offsets(step, batch_size, seq_len, seed)
    windows = np.stack([data.read(int(starts[i]), seq_len + 1) for micro in rows for i in micro])
    w = torch.from_numpy(windows).view(grad_accum, len(rows[0]), seq_len + 1)
    return w[..., :-1].contiguous(), w[..., 1:].contiguous()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from pinned memory without blocking the host on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

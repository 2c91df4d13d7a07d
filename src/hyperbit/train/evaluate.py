"""Validation loss and bits per byte of a model on token shards."""

from __future__ import annotations

import math

import torch

from ..data import DataError, TokenShards
from ..data.digits import ImageSet


@torch.no_grad()
def evaluate(model, data: TokenShards, seq_len: int, batch: int, max_batches: int, device,
             autocast) -> dict:
    """Mean next-token loss over the first ``max_batches`` validation windows, and bits per byte:
    total nats / ln 2 / the bytes the predicted tokens stand for.

    The bytes are counted per token from the data's table (:meth:`TokenShards.token_bytes`), not
    by decoding each window: a window that starts or ends inside a multi-byte character counts
    exactly the bytes of its tokens, so the windows of a split add up to the split's bytes (the
    end-of-text token counts as the two bytes of the separator byte shards hold in its place).
    The summed loss stays on ``device`` until the end: one host synchronisation per evaluation,
    not per batch. On an :class:`ImageSet` (a vision transformer): the mean cross-entropy and the
    accuracy (``val_acc``) over every test image (a few hundred: ``max_batches`` does not apply)."""
    if isinstance(data, ImageSet):
        return evaluate_images(model, data, batch, None, device, autocast)
    was_training = model.training
    model.eval()
    table = torch.tensor(data.token_bytes())  # a copy: the table is read-only (CPU, like y)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = bytes_ = 0
    for x, y in data.iter_eval_batches(batch, seq_len, max_batches=max_batches):
        with autocast:
            logits, _ = model(x.to(device, non_blocking=True))
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                   y.to(device, non_blocking=True).flatten(), reduction="sum")
        nats += losses.double()
        count += y.numel()
        bytes_ += int(table[y].sum())  # both on the CPU
    model.train(was_training)
    if count == 0:
        raise DataError("the validation split is too small for one evaluation window")
    total = float(nats)
    return {"val_loss": total / count, "val_bpb": total / math.log(2) / max(bytes_, 1)}


@torch.no_grad()
def evaluate_images(model, data: ImageSet, batch: int, max_batches: int, device, autocast) -> dict:
    """Mean cross-entropy and accuracy of an image classifier on ``data``."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in data.iter_eval_batches(batch, max_batches=max_batches):
        y = y.to(device, non_blocking=True)
        with autocast:
            logits, _ = model(x.to(device, non_blocking=True))
        nats += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise DataError("the test set has no images")
    return {"val_loss": float(nats) / count, "val_acc": int(correct) / count}

"""Validation loss and bits per byte of a model on token shards."""

from __future__ import annotations

import math

import torch

from ..data import DataError, TokenShards


@torch.no_grad()
def evaluate(model, data: TokenShards, seq_len: int, batch: int, max_batches: int, device,
             autocast) -> dict:
    """Mean next-token loss over the first ``max_batches`` validation windows, and bits per byte:
    total nats / ln 2 / the bytes the predicted tokens stand for.

    The bytes are counted per token from the data's table (:meth:`TokenShards.token_bytes`), not
    by decoding each window: a window that starts or ends inside a multi-byte character counts
    exactly the bytes of its tokens, so the windows of a split add up to the split's bytes (the
    end-of-text token counts as the two bytes of the separator byte shards hold in its place)."""
    was_training = model.training
    model.eval()
    table = torch.tensor(data.token_bytes())  # a copy: the table is read-only
    nats = count = bytes_ = 0
    for x, y in data.iter_eval_batches(batch, seq_len, max_batches=max_batches):
        with autocast:
            logits, _ = model(x.to(device))
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                                   reduction="sum")
        nats += float(losses)
        count += y.numel()
        bytes_ += int(table[y].sum())
    model.train(was_training)
    if count == 0:
        raise DataError("the validation split is too small for one evaluation window")
    return {"val_loss": nats / count, "val_bpb": nats / math.log(2) / max(bytes_, 1)}

"""Validation loss and bits per byte of a model on token shards."""

from __future__ import annotations

import math

import torch

from ..data import DataError, TokenShards


@torch.no_grad()
def evaluate(model, data: TokenShards, seq_len: int, batch: int, max_batches: int, device,
             autocast) -> dict:
    """Mean next-token loss over the first ``max_batches`` validation windows, and bits per byte
    (total nats / ln 2 / total UTF-8 bytes of the predicted tokens)."""
    was_training = model.training
    model.eval()
    tokenizer = data.load_tokenizer()
    nats = count = bytes_ = 0.0
    for x, y in data.iter_eval_batches(batch, seq_len, max_batches=max_batches):
        with autocast:
            logits, _ = model(x.to(device))
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                                   reduction="sum")
        nats += float(losses)
        count += y.numel()
        bytes_ += sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in y)
    model.train(was_training)
    if count == 0:
        raise DataError("the validation split is too small for one evaluation window")
    return {"val_loss": nats / count, "val_bpb": nats / math.log(2) / max(bytes_, 1.0)}

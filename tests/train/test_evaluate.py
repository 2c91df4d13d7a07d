"""Validation bits per byte count bytes exactly: windows that cut multi-byte characters (CJK,
emoji) add up to the UTF-8 bytes of what their targets encode, for the byte and the BPE tokenizer."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

from hyperbit.data import TokenShards, prepare
from hyperbit.train.evaluate import evaluate

# Every document starts with the ASCII digit "0" followed by a space: the first token of the
# stream (never a target) is the one byte "0" under either tokenizer.
DOCS = [f"0 第{i}章：日本語のテキストと絵文字 🐍🚀✓ ünïcödé {'漢字' * (i % 5)} end {i}"
        for i in range(24)]


class Bigram(nn.Module):
    """logits = a fixed random row per input token, so every target has its own loss."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx):
        return self.table[idx], None


def _prepared(tmp_path, tokenizer: str) -> TokenShards:
    src = tmp_path / "cjk.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / tokenizer
    prepare(src, out, tokenizer=tokenizer, vocab_size=300 if tokenizer == "bpe" else None, val_fraction=0.0)
    return TokenShards(out, "train")


def _old_count(tok, y: torch.Tensor) -> int:
    """What evaluate used to count: each window decoded on its own, then UTF-8 encoded."""
    return sum(len(tok.decode(row.tolist()).encode("utf-8")) for row in y)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_bits_per_byte_count_the_bytes_of_the_targets_exactly(tmp_path, tokenizer):
    shards = _prepared(tmp_path, tokenizer)
    tok = shards.load_tokenizer()
    stream = shards.read(0, shards.num_tokens)
    doc_bytes = [len(d.encode("utf-8")) + 2 for d in DOCS]  # each document + its separator
    # the split holds the same bytes under either tokenizer (the end-of-text token counts 2)
    assert int(shards.token_bytes()[stream].sum()) == sum(doc_bytes)
    if tokenizer == "byte":
        ends = np.cumsum(doc_bytes)
    else:
        assert tok.eot_id is not None
        ends = np.flatnonzero(stream == tok.eot_id) + 1  # token positions right after each document
    assert len(ends) == len(DOCS) and tok.decode([int(stream[0])]) == "0"

    # Windows [k*seq, k*seq + seq] covering the split up to the end of document m: the targets are
    # tokens 1 .. ends[m] - 1, which encode documents 0..m with their separators, less the "0".
    # Take the first (m, seq) whose window edges cut characters (the old count differs).
    found = None
    for m in range(len(DOCS) - 1, 2, -1):
        for seq in range(5, 48):
            n = (int(ends[m]) - 1) // seq
            if (int(ends[m]) - 1) % seq or n < 3:
                continue
            y = torch.from_numpy(stream[1:n * seq + 1].reshape(n, seq))
            expected = sum(doc_bytes[:m + 1]) - 1
            if _old_count(tok, y) != expected:
                found = (m, seq, n, y, expected)
                break
        if found:
            break
    assert found, "no window size cuts a multi-byte character"
    m, seq, n, y, expected = found

    model = Bigram(shards.vocab_size)
    model.train()
    result = evaluate(model, shards, seq, 2, -(-n // 2), torch.device("cpu"), nullcontext())
    assert model.training  # restored

    x = torch.from_numpy(stream[:n * seq].copy())
    nats = float(nn.functional.cross_entropy(model.table.detach()[x], y.flatten(), reduction="sum"))
    assert result["val_loss"] == pytest.approx(nats / (n * seq), rel=1e-6)
    assert result["val_bpb"] == pytest.approx(nats / math.log(2) / expected, rel=1e-6)
    # the old count is off by more than the tolerance above: windows cut characters into U+FFFD
    old = _old_count(tok, y)
    assert abs(old - expected) / expected > 1e-3, (old, expected)
    assert result["val_bpb"] != pytest.approx(nats / math.log(2) / old, rel=1e-6)


def test_evaluate_reads_the_byte_table_once(tmp_path, monkeypatch):
    shards = _prepared(tmp_path, "bpe")
    calls = []
    original = type(shards).load_tokenizer

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(shards), "load_tokenizer", counting)
    model = Bigram(shards.vocab_size)
    first = evaluate(model, shards, 16, 2, 2, torch.device("cpu"), nullcontext())
    second = evaluate(model, shards, 16, 2, 2, torch.device("cpu"), nullcontext())
    assert first == second and len(calls) == 1

"""Shared checks of the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def same_bits_at_any_thread_count():
    """``check(fn, counts=(4, 1, 2, 3))``: ``fn()`` (a tuple of tensors or Nones) gives the same bits
    with every thread count: each token's result is one thread's, and parameter gradients are
    sums of partial sums over fixed blocks of tokens, added in order. A run resumed with another
    thread count then reproduces the uninterrupted one."""
    def check(fn, counts=(4, 1, 2, 3)):
        threads = torch.get_num_threads()
        runs = []
        try:
            for count in counts:
                torch.set_num_threads(count)
                runs.append(fn())
        finally:
            torch.set_num_threads(threads)
        for run in runs[1:]:
            for a, b in zip(run, runs[0]):
                assert (a is None and b is None) or torch.equal(a, b)

    return check

"""Fixtures shared by the pathway tests."""

from __future__ import annotations

import pytest
from torch.autograd.graph import saved_tensors_hooks

from hyperbit.nn import native


@pytest.fixture(params=["native", "pytorch"])
def kernels(request, monkeypatch):
    """Both implementations of the fused nodes: the C kernels (CPU) and the PyTorch ops (the path
    on CUDA, and without a C compiler)."""
    if request.param == "pytorch":
        monkeypatch.setenv("HYPERBIT_NATIVE", "0")
    elif native.library() is None:
        pytest.skip("no C compiler: only the PyTorch path runs here")
    return request.param


@pytest.fixture
def saved_bytes():
    """``measure(fn, exclude=())``: bytes of the distinct storages autograd saves for backward while
    ``fn()`` runs (views and repeated saves of one tensor count once), less the storages whose data
    pointers are in ``exclude``."""
    def measure(fn, exclude=()):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(v for k, v in seen.items() if k not in exclude)

    return measure

"""Fixtures shared by the pathway tests."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from hyperbit import ModelConfig
from hyperbit.models import build_model
from hyperbit.nn import native

#: hyper-connected LM configs by short name
LM_KINDS = {"dhc": dict(pathway="hc"), "shc": dict(pathway="hc", hc_dynamic=False), "mhc": dict(pathway="mhc")}


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


@pytest.fixture
def connected_lm():
    """``build(kind, n=4, n_layers=3)``: a tiny hyper-connected LM (``LM_KINDS``) moved off the
    Pre-Norm-equivalent init, so that every connection weight matters."""
    def build(kind: str = "dhc", n: int = 4, n_layers: int = 3):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=2, max_seq_len=16,
                          expansion_rate=n, **LM_KINDS[kind])
        model = build_model(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(k in name for k in ("dynamic", "static", "phi", "bias_", "gate_")):
                    p.add_(0.2 * torch.randn_like(p))
        return model

    return build


@pytest.fixture
def lm_backward():
    """``run(model, autocast=False)``: one forward and backward of an LM on a fixed batch (its
    tokens as targets, under bf16 autocast if asked); returns ``(logits, loss, {name: grad})``
    (detached; parameters without a gradient left out)."""
    def run(model, autocast: bool = False):
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, idx)
        loss.backward()
        return (logits.detach(), loss.detach(),
                {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})

    return run

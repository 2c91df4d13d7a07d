"""cross_entropy: F.cross_entropy's value and gradient (fp32 log-sum-exp whatever the logits'
dtype), ignore_index, chunked rows equal to one chunk, no fp32 copy of the logits kept, and the
model's loss under bf16 autocast and with bf16 parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hyperbit as hb
from hyperbit.nn import loss as loss_module
from hyperbit.nn.loss import cross_entropy


def data(n=40, v=33, dtype=torch.float32, seed=0, ignored=(3, 17)):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, v, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignored)] = -100
    return logits, targets


def reference(logits, targets):
    """F.cross_entropy on the logits' values in fp64."""
    return F.cross_entropy(logits.double(), targets, ignore_index=-100)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6),
                                       (torch.bfloat16, 1e-6), (torch.float16, 1e-6)])
def test_value_and_gradient_equal_fp64_cross_entropy(dtype, tol):
    """The value is fp32 arithmetic on the given (rounded) logits: close to fp64 at fp32 round-off
    even for bf16 logits; the gradient is rounded once to the logits' dtype."""
    logits, targets = data(dtype=dtype)
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    ref = reference(logits, targets)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    (g,) = torch.autograd.grad(loss * 3.0, logits)
    (rg,) = torch.autograd.grad(ref * 3.0, logits)
    assert g.dtype == dtype
    grad_tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, tol)
    torch.testing.assert_close(g.double(), rg.double(), rtol=grad_tol, atol=grad_tol * rg.abs().max().item())
    assert torch.equal(g[[3, 17]], torch.zeros_like(g[[3, 17]]))  # ignored rows get no gradient


def test_chunked_rows_equal_one_chunk(monkeypatch):
    logits, targets = data(n=50, v=20)
    one = cross_entropy(logits, targets)
    (g_one,) = torch.autograd.grad(one, logits)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 7 * 20)  # 7 rows a chunk: 8 chunks, last short
    assert len(loss_module._chunks(50, 20)) == 8
    many = cross_entropy(logits, targets)
    (g_many,) = torch.autograd.grad(many, logits)
    torch.testing.assert_close(many, one, rtol=0, atol=0)
    torch.testing.assert_close(g_many, g_one, rtol=0, atol=0)


def test_all_ignored_is_nan_like_torch_and_bad_shapes_are_refused():
    logits, targets = data(n=4, ignored=(0, 1, 2, 3))
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(logits.unsqueeze(0), targets)


def test_keeps_no_fp32_copy_of_the_logits():
    """Saved for backward: the bf16 logits themselves and per-row vectors; never an (N, V) fp32."""
    logits, targets = data(n=64, v=50, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, targets)
    big = [t for t in saved if t.numel() == logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16
    assert all(t.numel() in (64, 64 * 50) for t in saved)


def test_compiled_formula_equals_the_eager_node(monkeypatch):
    logits, targets = data(dtype=torch.bfloat16)
    eager = cross_entropy(logits, targets)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plain = cross_entropy(logits, targets)
    torch.testing.assert_close(plain, eager, rtol=1e-6, atol=1e-6)


def _model(dtype=torch.float32):
    cfg = hb.ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, max_seq_len=16)
    torch.manual_seed(0)
    return hb.build_model(cfg).to(dtype)


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16"])
def test_model_loss_is_the_fp32_cross_entropy_of_its_logits(precision):
    """The model's loss against ``F.cross_entropy(logits.float())`` (the formula it replaces) on
    the very logits it returns, and the gradients of every parameter through both losses."""
    model = _model(torch.bfloat16 if precision == "bf16" else torch.float32)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 96, (2, 12), generator=g)
    targets = torch.randint(0, 96, (2, 12), generator=g)
    targets[0, :3] = -100
    ctx = torch.autocast("cpu", torch.bfloat16) if precision == "autocast" else torch.autocast("cpu", enabled=False)
    with ctx:
        logits, loss = model(idx, targets)
    if precision != "fp32":
        assert logits.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, params)
    tol = 1e-5 if precision == "fp32" else 1e-2
    for p, a, b in zip(params, grads, ref_grads):
        assert a.dtype == p.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())

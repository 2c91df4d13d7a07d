"""Every other width connection keeps no copy of its streams and rebuilds them in backward from
what the previous width and depth nodes keep (``hyper._offer_rebuild``, ``_hc_fused.rebuild_streams``):
same gradients, less memory, and no rebuild once the streams were changed in place."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn import native
from hyperbit.pathways import HyperConnection, ManifoldHyperConnection, hyper
from hyperbit.pathways._hc_fused import rebuild_streams


def _without_rebuild(monkeypatch):
    monkeypatch.setattr(hyper, "REBUILD_STREAMS", False)


@pytest.mark.parametrize("kind", ["dhc", "shc", "mhc"])
def test_rebuilt_streams_give_the_same_gradients_bit_for_bit_in_fp32(kind, kernels, monkeypatch, connected_lm, lm_backward):
    model = connected_lm(kind)
    _, loss, grads = lm_backward(model)
    _without_rebuild(monkeypatch)
    _, loss_ref, grads_ref = lm_backward(model)
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for k in grads:
        assert torch.equal(grads[k], grads_ref[k]), k


@pytest.mark.parametrize("kind", ["dhc", "mhc"])
def test_rebuilt_streams_under_autocast_are_as_close_as_the_bf16_copy(kind, kernels, monkeypatch, connected_lm, lm_backward):
    """Under bf16 autocast both ways keep bf16 round-off of the streams: a bf16 copy of H', or H'
    rebuilt from the bf16 copy of H. Both agree with the fp32 gradients to the same order."""
    model = connected_lm(kind)
    *_, fp32 = lm_backward(model)
    *_, rebuilt = lm_backward(model, autocast=True)
    _without_rebuild(monkeypatch)
    *_, copied = lm_backward(model, autocast=True)
    def rel_errors(grads):
        return torch.stack([(grads[k] - fp32[k]).norm() / (fp32[k].norm() + 1e-6) for k in fp32])

    err_rebuilt, err_copied = rel_errors(rebuilt), rel_errors(copied)
    # per parameter both are bf16 noise (a scalar gate's gradient is a sum with cancellations and
    # can land anywhere within a few times its peers); over all parameters they match
    assert err_rebuilt.mean() <= 1.25 * err_copied.mean(), (float(err_rebuilt.mean()), float(err_copied.mean()))
    assert err_rebuilt.median() <= 1.25 * err_copied.median(), (float(err_rebuilt.median()), float(err_copied.median()))
    assert err_copied.mean() > 0  # autocast did round


@pytest.mark.parametrize("cls", [HyperConnection, ManifoldHyperConnection])
def test_every_other_branch_keeps_no_copy_of_the_streams(cls, saved_bytes, monkeypatch):
    B, T, n, d = 2, 64, 4, 128
    hcs = [cls(d, n, k) for k in range(4)]
    h0 = torch.randn(B, T, n, d, requires_grad=True)

    def run():
        h = h0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for hc in hcs:
                h = hc(h, lambda x: torch.tanh(x) * 1.0)
        return h

    rebuilt = saved_bytes(run)
    _without_rebuild(monkeypatch)
    copied = saved_bytes(run)
    copy = B * T * n * d * 2  # one bf16 copy of the streams
    # two of the four branches keep none; a rebuilding node may count a per-token alpha that
    # the node before held anyway (mHC keeps it with its small graph, out of the hooks' sight)
    per_token = B * T * n * (n + 1) * 4
    assert 2 * copy - 2 * per_token <= copied - rebuilt <= 2 * copy, (copied, rebuilt)


def test_an_in_place_change_of_the_streams_cancels_the_rebuild(kernels):
    """H' changed in place between two connections: the next width node must keep its own copy
    (a rebuild would give the streams before the change, and wrong gradients)."""
    torch.manual_seed(0)
    a, b = HyperConnection(16, 3, 0).double(), HyperConnection(16, 3, 1).double()
    with torch.no_grad():
        for p in [*a.parameters(), *b.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    h0 = torch.randn(2, 5, 3, 16, dtype=torch.float64)

    def grads(fused):
        a.fused = b.fused = fused
        h = h0.clone().requires_grad_(True)
        mid = a(h, torch.tanh)
        mid = mid.clone() if not fused else mid
        mid.mul_(1.5).add_(0.25)  # in place, after the offer
        out = b(mid, torch.sin)
        return torch.autograd.grad(out.square().sum(), [h, *a.parameters(), *b.parameters()])

    for g, g_ref in zip(grads(True), grads(False)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_rebuilt_bf16_streams_match_the_kept_copy(kernels, monkeypatch, connected_lm, lm_backward):
    """A bf16 model: its streams are bf16, and the rebuilt ones go through bf16 too."""
    model = connected_lm().to(torch.bfloat16)
    _, loss, grads = lm_backward(model)
    _without_rebuild(monkeypatch)
    _, loss_ref, grads_ref = lm_backward(model)
    assert torch.equal(loss, loss_ref)
    for k in grads:
        g, g_ref = grads[k].float(), grads_ref[k].float()
        assert (g - g_ref).norm() <= 2.0**-7 * g_ref.norm() + 1e-6, k


@pytest.mark.skipif(native.library() is None, reason="no C compiler")
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_rebuild_kernel_matches_pytorch(per_token, bf16):
    g = torch.Generator().manual_seed(0)
    n, d = 3, 37
    prev = torch.randn(2, 5, n, d, generator=g)
    alpha = torch.randn(*((2, 5) if per_token else ()), n, n + 1, generator=g)
    beta = torch.randn(*((2, 5) if per_token else ()), n, generator=g)
    y = torch.randn(2, 5, d, generator=g)
    if bf16:
        prev, y = prev.bfloat16(), y.bfloat16()
    got = rebuild_streams(prev, alpha, beta, y, torch.float32, torch.float32, use_native=True)
    want = rebuild_streams(prev, alpha, beta, y, torch.float32, torch.float32, use_native=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    want64 = (alpha[..., 1:].transpose(-1, -2).double() @ prev.double()
              + beta.double().unsqueeze(-1) * y.double().unsqueeze(-2))
    torch.testing.assert_close(got.double(), want64, rtol=0, atol=1e-5)
    rounded = rebuild_streams(prev, alpha, beta, y, torch.float32, torch.bfloat16, use_native=True)
    torch.testing.assert_close(rounded, got.bfloat16().float(), rtol=2.0**-8, atol=0)
    assert torch.equal(rounded, rounded.bfloat16().float())

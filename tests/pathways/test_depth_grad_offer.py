"""A depth connection's backward run inside the next width connection's backward kernel
(``_depth_fused.DepthGradOffer``): the same gradients bit for bit, taken wherever the next width
node reads the depth node's output, and not taken where autograd adds a second gradient to that
output or the output was changed in place."""

from __future__ import annotations

import pytest
import torch

from hyperbit.models.fast import set_activation_checkpointing
from hyperbit.nn import native
from hyperbit.pathways import HyperConnection, _depth_fused, hyper

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the PyTorch path runs")


@pytest.fixture
def takes(monkeypatch):
    """The list of DepthGradOffer.take results (True: the node used the fused gradients)."""
    seen = []
    take = _depth_fused.DepthGradOffer.take

    def counted(self, g):
        out = take(self, g)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(_depth_fused.DepthGradOffer, "take", counted)
    return seen


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["dhc", "shc", "mhc"])
def test_the_fused_depth_backward_changes_no_bit(kind, autocast, monkeypatch, connected_lm, takes, lm_backward):
    model = connected_lm(kind, n_layers=3)
    grads = lm_backward(model, autocast)[2]
    # every depth node but the last (its output goes to the final norm) feeds a width node
    assert takes == [False] + [True] * 5
    monkeypatch.setattr(hyper, "FUSE_DEPTH_BACKWARD", False)
    grads_ref = lm_backward(model, autocast)[2]
    assert len(takes) == 6
    for k in grads_ref:
        assert torch.equal(grads[k], grads_ref[k]), k


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    a, b = HyperConnection(48, 4, 0), HyperConnection(48, 4, 1)
    with torch.no_grad():
        for p in [*a.parameters(), *b.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return a.to(dtype), b.to(dtype), torch.randn(2, 5, 4, 48, dtype=dtype)


@pytest.mark.parametrize("second_use", ["added", "in_place"])
def test_a_second_gradient_or_an_in_place_change_is_not_fused(second_use, monkeypatch, takes):
    """The streams between two connections also used elsewhere (autograd adds that gradient to the
    one the width node wrote), or changed in place after the depth node: the depth node computes
    its own backward, and the gradients are those of the unfused nodes."""
    a, b, h0 = _pair()

    def grads():
        h = h0.clone().requires_grad_(True)
        mid = a(h, torch.tanh)
        if second_use == "in_place":
            mid.mul_(1.5)
        out = b(mid, torch.sin).square().sum()
        if second_use == "added":
            out = out + (mid * mid.detach()).sum()
        return torch.autograd.grad(out, [h, *a.parameters(), *b.parameters()])

    fused = grads()
    assert True not in takes
    monkeypatch.setattr(hyper, "FUSE_DEPTH_BACKWARD", False)
    for g, g_ref in zip(fused, grads()):
        assert torch.equal(g, g_ref)


def test_the_offer_is_taken_between_two_connections(takes):
    """The plain case of the test above, so that its fallback is not a fusion that never runs."""
    a, b, h0 = _pair(torch.float64)
    h = h0.clone().requires_grad_(True)
    b(a(h, torch.tanh), torch.sin).square().sum().backward()
    assert takes == [False, True]  # b's depth node feeds no width node


def test_an_offer_holds_no_tensor_between_forward_and_backward(monkeypatch, connected_lm):
    """Nothing is kept alive by the offers (the width node reads beta and y from the depth node's
    saved tensors in backward), so activation checkpointing and saved-tensor hooks keep their say
    over what stays in memory."""
    made = []
    init = _depth_fused.DepthGradOffer.__init__

    def recorded(self):
        init(self)
        made.append(self)

    monkeypatch.setattr(_depth_fused.DepthGradOffer, "__init__", recorded)
    model = connected_lm("dhc", n_layers=2)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    assert len(made) == 4
    for offer in made:
        assert all(not isinstance(getattr(offer, k), torch.Tensor) for k in offer.__slots__)
    loss.backward()


@pytest.mark.parametrize("autocast", [False, True])
def test_with_activation_checkpointing_the_same_gradients(autocast, monkeypatch, connected_lm, takes, lm_backward):
    model = set_activation_checkpointing(connected_lm("dhc", n_layers=3))
    grads = lm_backward(model, autocast)[2]
    assert True in takes
    monkeypatch.setattr(hyper, "FUSE_DEPTH_BACKWARD", False)
    grads_ref = lm_backward(model, autocast)[2]
    for k in grads_ref:
        assert torch.equal(grads[k], grads_ref[k]), k

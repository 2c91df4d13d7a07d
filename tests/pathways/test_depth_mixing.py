"""With the C kernels the width connection leaves the mixing ``A_r^T H`` to the depth connection
(``_hc_fused.mixes_in_depth``): the width kernel writes no n*d ``mixed`` tensor and the depth kernel
reads the streams instead. Same values and gradients bit for bit, ``DepthContext.mixed`` still
usable by hand, and an in-place change of the streams while the branch runs is an error."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn import native
from hyperbit.pathways import HyperConnection, ManifoldHyperConnection, hyper, manifold

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the PyTorch path runs")

def _mixing_in_width(monkeypatch):
    for module in (hyper, manifold):
        monkeypatch.setattr(module, "mixes_in_depth", lambda *a: False)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["dhc", "shc", "mhc"])
def test_the_mixing_in_the_depth_node_changes_no_bit(kind, autocast, monkeypatch, connected_lm, lm_backward):
    model = connected_lm(kind, n_layers=2)
    widths = [m for m in model.modules() if isinstance(m, (HyperConnection, ManifoldHyperConnection))]
    contexts = []
    logits, _, grads = lm_backward(model, autocast)
    h = torch.randn(2, 3, 4, 32)
    contexts.append(widths[0].width_connection(h)[1])
    assert contexts[0].streams is not None and contexts[0].mix.stride() == (0, 0, 0, 0)  # no n*d tensor
    _mixing_in_width(monkeypatch)
    contexts.append(widths[0].width_connection(h)[1])
    assert contexts[1].streams is None and contexts[1].mix.stride() != (0, 0, 0, 0)
    logits_ref, _, grads_ref = lm_backward(model, autocast)
    assert torch.equal(logits, logits_ref)
    for k in grads_ref:
        assert torch.equal(grads[k], grads_ref[k]), k


@pytest.mark.parametrize("kind", ["dhc", "mhc"])
def test_depth_context_mixed_is_the_mixing_and_differentiable(kind, connected_lm):
    """By hand, ``ctx.mixed`` is A_r^T H (computed on demand) and its gradient reaches H and the
    connection's weights as the reference path's does."""
    conn = next(m for m in connected_lm(kind, n_layers=2).modules() if isinstance(m, (HyperConnection, ManifoldHyperConnection)))
    h = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    conn = conn.double()
    results = []
    for width in (conn.width_connection, conn.width_connection_reference):
        hh = h.clone().requires_grad_(True)
        x, ctx = width(hh)
        out = ctx.mixed + x.tanh().unsqueeze(-2)
        loss = (out * torch.linspace(-1, 1, 32, dtype=out.dtype)).square().sum()
        results.append((out.detach(), torch.autograd.grad(loss, [hh, *conn.parameters()], allow_unused=True)))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["dhc", "mhc"])
def test_streams_changed_in_place_while_the_branch_runs_is_an_error(kind, connected_lm):
    conn = next(m for m in connected_lm(kind, n_layers=2).modules() if isinstance(m, (HyperConnection, ManifoldHyperConnection)))
    h = torch.randn(2, 3, 4, 32, requires_grad=True).clone()

    def branch(x):
        with torch.no_grad():
            h.mul_(2)  # the streams the width connection read, changed behind its back
        return x

    with pytest.raises(RuntimeError, match="modified in place"):
        conn(h, branch)

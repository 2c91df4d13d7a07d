"""Shape mistakes with hyper-connections are one-line ValueErrors that say what was expected.

The dangerous one is a ``(B, T, d)`` hidden state whose T happens to equal n: without a check
it runs, and mixes sequence positions as if they were streams.
"""

from __future__ import annotations

import pytest
import torch

from hyperbit.pathways import HyperConnection, expand_streams, make_pathway, reduce_streams

N, D = 4, 16


def one_line_error(fn, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("grad", [True, False], ids=["fused", "no_grad"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_hidden_state_whose_length_equals_n_is_refused(dynamic, grad):
    hc = HyperConnection(D, N, branch_index=0, dynamic=dynamic)
    h = torch.randn(2, N, D)  # (B, T, d) with T == n: not streams
    branch = torch.nn.Linear(D, D)
    with torch.set_grad_enabled(grad):
        for call in (lambda: hc(h, branch), lambda: hc.width_connection(h),
                     lambda: hc.width_connection_reference(h), lambda: hc.connection_weights(h),
                     lambda: hc.skip(h)):
            one_line_error(call, "(B, T, n, d) = (B, T, 4, 16)", f"got shape (2, {N}, {D})",
                           "expand_streams(h, 4)")
        # the same state, expanded once, is what the connection takes
        out = hc(expand_streams(h, N), branch)
    assert out.shape == (2, N, N, D)


@pytest.mark.parametrize("shape", [(2, 5, 3, D), (2, 5, N, D + 1), (5, N, D), (2, 1, 5, N, D), (N, D)])
def test_streams_of_the_wrong_shape_are_refused(shape):
    hc = HyperConnection(D, N, branch_index=1)
    one_line_error(lambda: hc(torch.randn(shape), torch.nn.Identity()),
                   "expects streams (B, T, n, d) = (B, T, 4, 16)", f"got shape {shape}")


def test_branch_output_of_the_wrong_shape_is_refused():
    hc = HyperConnection(D, N, branch_index=0)
    H = expand_streams(torch.randn(2, 5, D), N)
    x, ctx = hc.width_connection(H)
    for y in (x[:, :1], x.unsqueeze(-2), x[..., :-1]):
        one_line_error(lambda: hc.depth_connection(ctx, y), "branch output (B, T, d) = (2, 5, 16)",
                       f"got shape {tuple(y.shape)}")
    one_line_error(lambda: hc(H, lambda t: t[:, :1]), "branch output")  # would broadcast over T


def test_expand_streams_takes_a_hidden_state_once():
    h = torch.randn(2, 5, D)
    H = expand_streams(h, N)
    assert H.shape == (2, 5, N, D)
    one_line_error(lambda: expand_streams(H, N), "expand_streams expects a hidden state (B, T, d)",
                   f"got shape (2, 5, {N}, {D})", "already expanded")
    one_line_error(lambda: expand_streams(h[0], N), "(B, T, d)", f"got shape (5, {D})")
    for bad in (0, -1, 2.0, True):
        one_line_error(lambda: expand_streams(h, bad), "expansion_rate must be an int >= 1",
                       repr(bad))


def test_reduce_streams_does_not_sum_over_the_sequence():
    h = torch.randn(2, N, D)  # a (B, T, d) hidden state, T == n
    one_line_error(lambda: reduce_streams(h), "reduce_streams expects streams (B, T, n, d)",
                   f"got shape (2, {N}, {D})", "expand_streams")
    hc = make_pathway("hc", D, 0, expansion_rate=N)
    one_line_error(lambda: hc.reduce(h), "(B, T, 4, d)", f"got shape (2, {N}, {D})")
    one_line_error(lambda: hc.reduce(torch.randn(2, 5, 3, D)), "(B, T, 4, d)", "got shape (2, 5, 3, 16)")
    H = torch.randn(2, 5, N, D)
    torch.testing.assert_close(reduce_streams(H), H[:, :, 0] + H[:, :, 1] + H[:, :, 2] + H[:, :, 3])
    torch.testing.assert_close(hc.reduce(H), reduce_streams(H))


@pytest.mark.parametrize("kind", ["hc", "sequential", "parallel"])
def test_every_hc_kind_checks_its_streams(kind):
    n = 2
    p = make_pathway(kind, D, 0, expansion_rate=n)
    one_line_error(lambda: p(torch.randn(3, n, D), torch.nn.Identity()), "(B, T, n, d) = (B, T, 2, 16)")

"""The hyper-connection kernels as ``torch.library`` operators (``hyperbit/nn/native_ops.py``):
each operator's schema and fake implementation (``opcheck``). That compiled blocks call them and
match the eager model: ``tests/models/test_fast.py``."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn import native, native_ops as ops

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the PyTorch path runs")

B, T, N, D = 2, 3, 4, 16


def _t(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("save_bf16", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_operators_pass_opcheck(save_bf16, norm):
    h, w = _t(B, T, N, D), (_t(D, seed=1) if norm else None)
    for mixed in (True, False):
        torch.library.opcheck(ops._hc_forward_op, (h, _t(N, N + 1, seed=2), save_bf16, w, 1e-6, mixed))
        torch.library.opcheck(ops._hc_forward_op, (h, _t(B, T, N, N + 1, seed=2), save_bf16, w, 1e-6, mixed))
        torch.library.opcheck(ops._hc_forward_dynamic_op, (
            h, _t(N, N + 1, seed=2), _t(N, seed=3), _t(N + 2, D, seed=4), torch.full((1,), 0.5),
            torch.full((1,), 0.25), 1e-6, True, save_bf16, w, 1e-6, mixed))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("norm,need_gain", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_backward_operator_passes_opcheck(dynamic, norm, need_gain, h_dtype):
    h = _t(B, T, N, D).to(h_dtype)
    alpha = _t(B, T, N, N + 1, seed=1) if dynamic else _t(N, N + 1, seed=1)
    dyn = ((_t(B, T, N, seed=2), _t(B, T, N, N + 2, seed=3).tanh(), _t(B, T, N, 1, seed=4).abs(),
            _t(B, T, N, N + 2, seed=5), _t(N + 2, D, seed=6), torch.full((1,), 0.5), torch.full((1,), 0.25))
           if dynamic else (None,) * 7)
    rest = (alpha, _t(B, T, D, seed=7), _t(B, T, N, D, seed=8), *dyn, True, h_dtype != torch.float32,
            _t(B, T, 1, seed=9).abs() if norm else None, _t(D, seed=10) if norm else None, need_gain)
    torch.library.opcheck(ops._hc_backward_op, (h, None, None, None, None, *rest))
    torch.library.opcheck(ops._hc_backward_op, (None, *_source(h_dtype), *rest))
    torch.library.opcheck(ops._hc_branch_input_op, (h, None, None, None, None, alpha, torch.float32, False))
    torch.library.opcheck(ops._hc_branch_input_op, (None, *_source(h_dtype), alpha, torch.float32, True))


def _source(dtype):
    """(prev, alpha, beta, y) that rebuild streams: per-token weights, prev and y in ``dtype``."""
    return (_t(B, T, N, D, seed=11).to(dtype), _t(B, T, N, N + 1, seed=12), _t(B, T, N, seed=13),
            _t(B, T, D, seed=14).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebuild_operator_passes_opcheck(dtype):
    torch.library.opcheck(ops._hc_rebuild_op, (*_source(dtype), torch.float32, dtype != torch.float32))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("need_y,need_beta", [(True, True), (True, False), (False, True)])
def test_depth_operators_pass_opcheck(per_token, need_y, need_beta):
    beta = _t(B, T, N, seed=1) if per_token else _t(N, seed=1)
    y = _t(B, T, D, seed=2).bfloat16()
    torch.library.opcheck(ops._depth_forward_op, (_t(B, T, N, D), beta, y))
    torch.library.opcheck(ops._depth_backward_op, (_t(B, T, N, D, seed=3), beta, y, need_y, need_beta))


def _mhc_forward_args(save_bf16: bool, mixed: bool, h=None):
    """Arguments of mHC's forward operator: n = N streams, phi (2n + n^2, n d), the map's biases
    and gates, 20 Sinkhorn iterations, the branch norm's gain."""
    from hyperbit.pathways.sinkhorn import _DEFICIT_FLOOR, LOGIT_RANGE

    m = 2 * N + N * N
    h = _t(B, T, N, D) if h is None else h
    return (h, 0.1 * _t(m, N * D, seed=1), 1e-6, _t(m, seed=2), torch.tensor([0.5, 0.25, 0.75]), 20, LOGIT_RANGE,
            _DEFICIT_FLOOR, save_bf16, _t(D, seed=3), 1e-6, mixed)


@pytest.mark.parametrize("save_bf16", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
def test_mhc_forward_operator_passes_opcheck(save_bf16, mixed):
    torch.library.opcheck(ops._mhc_forward_op, _mhc_forward_args(save_bf16, mixed))


@pytest.mark.parametrize("with_mixed,with_post,need_gain", [(True, True, True), (False, False, False)])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_mhc_backward_operator_passes_opcheck(with_mixed, with_post, need_gain, h_dtype):
    """From a forward's own results (z, r, the res logits, alpha, post); streams given, or rebuilt
    from a source (prev and y in ``h_dtype``)."""
    fwd = _mhc_forward_args(False, True, _t(B, T, N, D).to(h_dtype).float())
    (_, _, _, rstd), (z, r, logits, alpha, post) = ops.native_mhc.mhc_forward(*fwd)
    h, phi, _, _, a, iters, logit_range, floor, _, norm_w = fwd[:10]
    rest = (alpha, _t(B, T, D, seed=7), _t(B, T, N, D, seed=8) if with_mixed else None, rstd, norm_w, need_gain,
            z, r, logits, post, _t(B, T, N, seed=9) if with_post else None, a, iters, logit_range, floor, phi)
    torch.library.opcheck(ops._mhc_backward_op, (h, None, None, None, None, *rest, False))
    torch.library.opcheck(ops._mhc_backward_op, (None, *_source(h_dtype), *rest, h_dtype != torch.float32))

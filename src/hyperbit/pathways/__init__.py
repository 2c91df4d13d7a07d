"""Residual pathways: one interface for Pre-Norm, Post-Norm and hyper-connections.

Plain tensors in, tensors out: a pathway knows nothing of model configs or training.
:func:`make_pathway` builds one by name; users bringing their own model use
:class:`HyperConnection`, :func:`expand_streams` and :func:`reduce_streams` directly.
"""

from __future__ import annotations

from .base import Branch, Pathway, expand_streams, reduce_streams
from .hyper import (HyperConnection, output_std_scale, parallel_matrix, pre_norm_matrix,
                    sequential_matrix)
from .frac import FracConnection
from .manifold import ManifoldHyperConnection
from .residual import PostNorm, PreNorm

KINDS = ("prenorm", "postnorm", "hc", "sequential", "parallel", "mhc", "frac")


def make_pathway(kind: str, dim: int, branch_index: int, *, expansion_rate: int = 1,
                 dynamic: bool = True, use_tanh: bool = True, eps: float = 1e-6,
                 mhc_init: str = "residual", mhc_res: str = "sinkhorn", sinkhorn_iters: int = 20,
                 frac_rate: int = 1) -> Pathway:
    """The pathway ``kind`` (one of :data:`KINDS`) for branch ``branch_index`` (0, 1, ... in
    execution order). ``expansion_rate``, ``dynamic`` and ``use_tanh`` apply to hyper-connections
    (``dynamic`` and ``use_tanh`` to frac-connections too); ``sequential`` (n = 2) and
    ``parallel`` are hyper-connections with fixed matrices; ``mhc_*`` / ``sinkhorn_iters`` apply
    to manifold-constrained HC, ``frac_rate`` (m fractions) to frac-connections."""
    if kind == "prenorm":
        return PreNorm(dim, eps)
    if kind == "postnorm":
        return PostNorm(dim, eps)
    if kind == "hc":
        return HyperConnection(dim, expansion_rate, branch_index, dynamic=dynamic,
                               use_tanh=use_tanh, eps=eps)
    if kind == "mhc":
        return ManifoldHyperConnection(dim, expansion_rate, branch_index, init=mhc_init,
                                       res=mhc_res, sinkhorn_iters=sinkhorn_iters, eps=eps)
    if kind == "frac":
        return FracConnection(dim, frac_rate, branch_index, dynamic=dynamic, use_tanh=use_tanh,
                              eps=eps)
    if kind == "sequential":
        matrix = sequential_matrix()
    elif kind == "parallel":
        matrix = parallel_matrix(expansion_rate, branch_index)
    else:
        raise ValueError(f"pathway={kind!r} is not allowed; choose one of {list(KINDS)}")
    return HyperConnection(dim, matrix.shape[0] - 1, branch_index, dynamic=False, eps=eps,
                           matrix=matrix, learnable=False)


__all__ = ["Branch", "FracConnection", "HyperConnection", "KINDS", "ManifoldHyperConnection", "Pathway", "PostNorm", "PreNorm",
           "expand_streams", "make_pathway", "output_std_scale", "parallel_matrix",
           "pre_norm_matrix", "reduce_streams", "sequential_matrix"]

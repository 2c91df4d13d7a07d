"""Residual pathways: one interface for Pre-Norm, Post-Norm and hyper-connections.

``make_pathway(cfg, branch_index)`` builds the pathway a :class:`~hyperbit.config.ModelConfig`
asks for; users bringing their own model use :class:`HyperConnection`, :func:`expand_streams` and
:func:`reduce_streams` directly.
"""

from __future__ import annotations

from ..config import ModelConfig
from .base import Branch, Pathway, expand_streams, reduce_streams
from .hyper import (HyperConnection, output_std_scale, parallel_matrix, pre_norm_matrix,
                    sequential_matrix)
from .residual import PostNorm, PreNorm


def make_pathway(cfg: ModelConfig, branch_index: int) -> Pathway:
    """The pathway for branch ``branch_index`` (0 .. 2L-1, attention and FFN alternating)."""
    if cfg.pathway == "prenorm":
        return PreNorm(cfg.dim, cfg.norm_eps)
    if cfg.pathway == "postnorm":
        return PostNorm(cfg.dim, cfg.norm_eps)
    n = cfg.expansion_rate
    if cfg.pathway == "hc":
        return HyperConnection(cfg.dim, n, branch_index, dynamic=cfg.hc_dynamic,
                               use_tanh=cfg.hc_tanh, eps=cfg.norm_eps)
    matrix = sequential_matrix() if cfg.pathway == "sequential" else parallel_matrix(n, branch_index)
    return HyperConnection(cfg.dim, n, branch_index, dynamic=False, eps=cfg.norm_eps,
                           matrix=matrix, learnable=False)


__all__ = ["Branch", "HyperConnection", "Pathway", "PostNorm", "PreNorm", "expand_streams",
           "make_pathway", "output_std_scale", "parallel_matrix", "pre_norm_matrix",
           "reduce_streams", "sequential_matrix"]

"""Manifold-constrained hyper-connections (mHC, DeepSeek, arXiv 2512.24880): spec section 7."""

from __future__ import annotations

from .base import Pathway


class ManifoldHyperConnection(Pathway):
    def __init__(self, dim: int, expansion_rate: int, branch_index: int, *, init: str = "residual",
                 res: str = "sinkhorn", sinkhorn_iters: int = 20, eps: float = 1e-6):
        super().__init__()
        raise NotImplementedError("pathway='mhc' is not available yet")

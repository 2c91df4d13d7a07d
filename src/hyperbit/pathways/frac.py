"""Frac-connections (arXiv 2503.14125): spec section 7."""

from __future__ import annotations

from .base import Pathway


class FracConnection(Pathway):
    def __init__(self, dim: int, frac_rate: int, branch_index: int, *, dynamic: bool = True,
                 use_tanh: bool = True, eps: float = 1e-6):
        super().__init__()
        raise NotImplementedError("pathway='frac' is not available yet")

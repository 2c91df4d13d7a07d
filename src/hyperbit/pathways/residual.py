"""Plain residual pathways: Pre-Norm ``h + T(norm(h))`` and Post-Norm ``norm(h + T(h))``."""

from __future__ import annotations

from torch import Tensor

from ..nn.norm import RMSNorm
from .base import Branch, Pathway


class PreNorm(Pathway):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)

    def forward(self, h: Tensor, branch: Branch) -> Tensor:
        return h + branch(self.norm(h))


class PostNorm(Pathway):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)

    def forward(self, h: Tensor, branch: Branch) -> Tensor:
        return self.norm(h + branch(h))

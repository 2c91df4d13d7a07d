"""The one interface every residual pathway implements.

A pathway wraps one branch (an attention or FFN sub-layer). It owns the norm placement and the
residual addition, so a block never writes ``h + ...`` itself and cannot get the wiring wrong::

    h = self.attn_path(h, self.attn)   # width-connect -> norm -> branch -> depth-connect
    h = self.ffn_path(h, self.ffn)

The residual state ``h`` is ``(B, T, d)`` for plain residuals and ``(B, T, n, d)`` (n =
``expansion_rate`` streams) for hyper-connections. A model converts its hidden state into the
pathway's state once, with :meth:`Pathway.expand`, and back once, with :meth:`Pathway.reduce`.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..nn.norm import RMSNorm

Branch = Callable[[Tensor], Tensor]


class Pathway(nn.Module):
    #: n, the number of residual streams the state carries (1 for plain residuals)
    expansion_rate: int = 1

    def forward(self, h: Tensor, branch: Branch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def skip(self, h: Tensor) -> Tensor:
        """The state this pathway produces when its branch outputs zero (the skip path alone)."""
        return self(h, _zero_branch)

    def expand(self, h: Tensor) -> Tensor:
        """A model's hidden state ``(B, T, d)`` as this pathway's state (once, before the first
        branch). Plain residuals keep it as it is."""
        return h

    def reduce(self, h: Tensor) -> Tensor:
        """This pathway's state as one hidden state ``(B, T, d)`` (once, after the last branch)."""
        return h

    def norms(self) -> list[nn.Module]:
        """Norm modules this pathway owns (each must belong to exactly one pathway)."""
        return [m for m in self.modules() if isinstance(m, RMSNorm)]


def _zero_branch(x: Tensor) -> Tensor:
    return x * 0.0


def expand_streams(h: Tensor, expansion_rate: int) -> Tensor:
    """``(B, T, d) -> (B, T, n, d)``: n = ``expansion_rate`` copies of the hidden state (a
    broadcast view, no copy)."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], expansion_rate, h.shape[-1])


def reduce_streams(h: Tensor) -> Tensor:
    """``(B, T, n, d) -> (B, T, d)``: the sum of the streams."""
    return h.sum(dim=-2)

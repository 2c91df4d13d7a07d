"""The one interface every residual pathway implements.

A pathway wraps one branch (an attention or FFN sub-layer). It owns the norm placement and the
residual addition, so a block never writes ``h + ...`` itself and cannot get the wiring wrong::

    h = self.attn_path(h, self.attn)   # width-connect -> norm -> branch -> depth-connect
    h = self.ffn_path(h, self.ffn)

The residual state ``h`` is ``(B, T, d)`` for plain residuals and ``(B, T, n, d)`` (n streams)
for hyper-connections; :func:`expand_streams` / :func:`reduce_streams` convert once per model.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

Branch = Callable[[Tensor], Tensor]


class Pathway(nn.Module):
    #: True when the state carries n streams, ``(B, T, n, d)``; False for ``(B, T, d)``.
    uses_streams: bool = False

    def forward(self, h: Tensor, branch: Branch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def skip(self, h: Tensor) -> Tensor:
        """The state this pathway produces when its branch outputs zero (the skip path alone)."""
        return self(h, _zero_branch)

    def norms(self) -> list[nn.Module]:
        """Norm modules this pathway owns (each must belong to exactly one pathway)."""
        from ..nn.norm import RMSNorm
        return [m for m in self.modules() if isinstance(m, RMSNorm)]


def _zero_branch(x: Tensor) -> Tensor:
    return x * 0.0


def expand_streams(h: Tensor, n: int) -> Tensor:
    """``(B, T, d) -> (B, T, n, d)``: n copies of the hidden state (a broadcast view, no copy)."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1])


def reduce_streams(h: Tensor) -> Tensor:
    """``(B, T, n, d) -> (B, T, d)``: the sum of the streams."""
    return h.sum(dim=-2)

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
    #: set by a block whose code hands this pathway's output, unchanged, straight to the next
    #: pathway: a hyper-connection may then let the next one rebuild its streams in backward
    #: inside ``torch.compile`` too, where the version check of an in-place change cannot run
    #: (see ``hyper._offer_rebuild``)
    feeds_next: bool = False

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
    broadcast view, no copy). Anything but a 3-D hidden state is a ValueError."""
    if isinstance(expansion_rate, bool) or not isinstance(expansion_rate, int) or expansion_rate < 1:
        raise ValueError(f"expand_streams: expansion_rate must be an int >= 1, got {expansion_rate!r}")
    if h.dim() != 3:
        hint = " (already expanded streams? expand once per model)" if h.dim() == 4 else ""
        raise ValueError(f"expand_streams expects a hidden state (B, T, d), got shape "
                         f"{tuple(h.shape)}{hint}")
    return h.unsqueeze(-2).expand(*h.shape[:-1], expansion_rate, h.shape[-1])


def reduce_streams(h: Tensor, expansion_rate: int | None = None) -> Tensor:
    """``(B, T, n, d) -> (B, T, d)``: the sum of the streams. Anything but 4-D streams (with n =
    ``expansion_rate`` if given) is a ValueError: a 3-D ``(B, T, d)`` tensor would be summed over T."""
    check_streams(h, expansion_rate, where="reduce_streams")
    return h.sum(dim=-2)


def check_streams(h: Tensor, expansion_rate: int | None = None, dim: int | None = None, *,
                  where: str = "hyper-connection") -> None:
    """Raise a one-line ValueError unless ``h`` is ``(B, T, n, d)`` streams (n = ``expansion_rate``
    and d = ``dim`` where given). Shapes only: nothing is read from the tensor."""
    if (h.dim() == 4 and (expansion_rate is None or h.shape[-2] == expansion_rate)
            and (dim is None or h.shape[-1] == dim)):
        return
    n = "n" if expansion_rate is None else expansion_rate
    want = "(B, T, n, d)"
    if expansion_rate is not None or dim is not None:
        want += f" = (B, T, {n}, {'d' if dim is None else dim})"
    hint = ""
    if h.dim() == 3:
        hint = f"; a (B, T, d) hidden state is not streams: expand it once with expand_streams(h, {n})"
    raise ValueError(f"{where} expects streams {want} made by expand_streams, got shape "
                     f"{tuple(h.shape)}{hint}")

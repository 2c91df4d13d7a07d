"""What the residual pathway learned: the unfolded connection matrix and the composite gain.

For branches ``k = 1 .. K`` (attention and FFN in execution order) with connection weights
``B_k`` (row, n), ``A_m^k`` (column, n) and ``A_r^k`` (n x n), unrolling the recurrence gives the
input of branch ``k`` as a weighted sum of every earlier branch output (spec section 5)::

    x_k = sum_{j<k} c_kj T_j(x_j),    c_kj = B_j (A_r^{j+1} ... A_r^{k-1}) A_m^k

Column 0 is the embedding (``B_0`` = all ones: the expand), and a last row ``K+1`` is the model
output, which reads the streams with the reduce (all ones) instead of ``A_m``. Plain residuals are
the n = 1 case ``B = A_m = A_r = 1`` (Pre-Norm: ones below the diagonal). Frac-connections mix
fractions with m x m matrices; :func:`frac_weights` says how their C is defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..pathways import FracConnection, HyperConnection, ManifoldHyperConnection
from ._hooks import recording

#: pathways with connection weights (``connection_weights(h) -> alpha, beta``); mHC gives its
#: pre, res and post as A_m = pre, A_r = res^T, B = post
WEIGHTED = (HyperConnection, ManifoldHyperConnection, FracConnection)


@dataclass
class BranchWeights:
    """One branch's connection weights (static, or averaged over tokens for dynamic HC)."""

    beta: Tensor  # (n,)   B: how the branch output is written into the streams
    a_m: Tensor  # (n,)    A_m: how the branch input is read from the streams
    a_r: Tensor  # (n, n)  A_r: stream mixing, H' = A_r^T H


def _residual() -> BranchWeights:
    """A plain residual connection: the n = 1 case ``B = A_m = A_r = 1``."""
    one = torch.ones(1)
    return BranchWeights(one, one, one.view(1, 1))


def from_matrix(matrix: Tensor) -> BranchWeights:
    """Split an ``(n+1, n+1)`` connection matrix ``[[0, B], [A_m, A_r]]``."""
    return BranchWeights(beta=matrix[0, 1:], a_m=matrix[1:, 0], a_r=matrix[1:, 1:])


def frac_weights(alpha: Tensor, beta: Tensor) -> BranchWeights:
    """A frac-connection's ``alpha = [A_m | A_r]`` (m, 2m) and B (m,) in the scalar form
    :func:`unfold` takes. Over fractions the coefficient of output j in branch k's input is an
    m x m matrix ``M = diag(B_j) A_r^{j+1} ... A_r^{k-1} A_m^k`` (``M[l, i]``: fraction l of the
    output in fraction i of the input); ``c_kj`` is its entry sum over m, the mean over the input's
    fractions of what it takes from output j: ``a_m = A_m 1 / m``, and the model output, which
    concatenates the fractions, reads with ``1 / m`` (:func:`output_weights`). Identity weights
    (init) give Pre-Norm's all-ones C."""
    m = beta.shape[-1]
    return BranchWeights(beta=beta.float(), a_m=alpha[:, :m].sum(1).float() / m, a_r=alpha[:, m:].float())


def output_weights(pathways: list) -> Tensor | None:
    """How the model output reads the state, for :func:`unfold`: None (all ones, the sum of the
    streams) except for frac-connections, whose reduce concatenates the m fractions (1 / m)."""
    p = pathways[-1]
    return torch.full((p.frac_rate,), 1.0 / p.frac_rate) if isinstance(p, FracConnection) else None


def unfold(branches: list[BranchWeights], output: Tensor | None = None) -> Tensor:
    """The ``(K+1, K+1)`` lower-triangular matrix ``C``: row ``k-1`` holds branch ``k``'s input
    coefficients ``c_kj`` over columns ``j = 0 .. K-1`` (0 = embedding); the last row is the model
    output over columns ``0 .. K`` (it also sees the last branch), read with ``output`` (default
    all ones: the sum of the streams; see :func:`output_weights`)."""
    K = len(branches)
    n = branches[0].a_m.numel()
    ones = torch.ones(n, dtype=torch.float64, device=branches[0].a_r.device)
    # written[j]: the stream vector that output j occupies right after it is written
    written = [ones] + [b.beta.double() for b in branches]
    C = torch.zeros(K + 1, K + 1, dtype=torch.float64, device=ones.device)
    for k in range(1, K + 2):  # k = K + 1 is the model output
        read = (branches[k - 1].a_m.double() if k <= K else
                ones if output is None else output.to(ones))
        for j in range(k):
            v = written[j]
            for i in range(j + 1, k):  # carried through the mixing of every branch in between
                v = v @ branches[i - 1].a_r.double()
            C[k - 1, j] = v @ read
    return C


def composite_gain(branches: list[BranchWeights]) -> tuple[Tensor, Tensor]:
    """Largest absolute row sum and column sum of ``A_r^1 A_r^2 ... A_r^k`` for every depth k:
    how much the stream mixing alone can amplify a signal (the quantity mHC bounds)."""
    product = torch.eye(branches[0].a_m.numel(), dtype=torch.float64, device=branches[0].a_r.device)
    rows, cols = [], []
    for b in branches:
        product = product @ b.a_r.double()
        rows.append(product.abs().sum(1).max())
        cols.append(product.abs().sum(0).max())
    return torch.stack(rows), torch.stack(cols)


@dataclass
class PathwayState:
    """What one branch's pathway saw in a forward pass: the state, and for hyper-connections the
    connection weights (per token for dynamic ones) computed from it."""

    pathway: object
    h: Tensor  # the residual (B, T, d) or the streams (B, T, n, d)
    alpha: Tensor | None = None  # (n, n+1) or (B, T, n, n+1), fp32; None for plain residuals
    beta: Tensor | None = None  # (n,) or (B, T, n)


@torch.no_grad()
def pathway_states(model, idx: Tensor) -> list[PathwayState]:
    """Run ``model`` on ``idx`` once and record every branch's :class:`PathwayState`, in execution
    order. The weights are computed inside the forward pass, where sharded (FSDP2) parameters are
    gathered (compiled blocks run eagerly meanwhile: :func:`._hooks.recording`)."""
    states = []

    def record(mod, args):
        weights = mod.connection_weights(args[0]) if isinstance(mod, WEIGHTED) else (None, None)
        states.append(PathwayState(mod, args[0], *weights))

    with recording(model.pathways(), record, pre=True):
        model(idx)
    return states


def branch_weights_from_states(states: list[PathwayState]) -> list[BranchWeights]:
    """Connection weights per branch from :func:`pathway_states`: static matrices as they are,
    dynamic ones averaged over the tokens. Plain residuals are the n = 1 identity connection."""
    out = []
    for st in states:
        if st.alpha is None:
            out.append(_residual())
            continue
        alpha, beta = st.alpha.detach(), st.beta.detach()
        alpha = alpha.reshape(-1, *alpha.shape[-2:]).mean(0) if alpha.dim() > 2 else alpha
        beta = beta.reshape(-1, beta.shape[-1]).mean(0) if beta.dim() > 1 else beta
        if isinstance(st.pathway, FracConnection):
            out.append(frac_weights(alpha, beta))
            continue
        out.append(BranchWeights(beta=beta.float(), a_m=alpha[:, 0].float(), a_r=alpha[:, 1:].float()))
    return out


def model_branch_weights(model, idx: Tensor | None = None) -> list[BranchWeights]:
    """Connection weights of every branch of a :class:`~hyperbit.models.TransformerLM`: static
    matrices as they are; dynamic ones averaged over the tokens of ``idx`` (required for DHC).
    Plain residual pathways are the n = 1 identity connection; for Post-Norm that describes only
    its additions (its normalisation of the whole residual is not a fixed linear map)."""
    pathways = model.pathways()
    if not any(isinstance(p, WEIGHTED) and p.dynamic for p in pathways):
        with torch.no_grad():
            return [from_matrix(p.matrix()) if isinstance(p, HyperConnection) else
                    frac_weights(p.static_alpha.detach(), p.static_beta.detach())
                    if isinstance(p, FracConnection) else _residual() for p in pathways]
    if idx is None:
        raise ValueError("dynamic hyper-connections need a batch of token ids (idx) to average over")
    return branch_weights_from_states(pathway_states(model, idx))

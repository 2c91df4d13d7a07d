"""Representation collapse (spec section 6): cosine similarity of consecutive branch inputs.

Pre-Norm's branch inputs drift towards cosine 1 in deep layers (each branch sees nearly the same
vector); hyper-connections keep them lower, with a wider band. Reported per depth as the median
and the 5th-95th percentile band over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pathways import FracConnection
from .connections import PathwayState, pathway_states


def consecutive_cosine(inputs: list[Tensor], quantiles=(0.05, 0.5, 0.95)) -> dict[str, Tensor]:
    """``inputs[k]``: branch k's input, ``(..., d)``. Returns ``{"p05", "median", "p95"}``, each of
    length ``len(inputs) - 1``: quantiles over tokens of ``cos(x_k, x_{k+1})``."""
    if len(inputs) < 2:
        raise ValueError("need the inputs of at least two branches")
    cos = torch.stack([F.cosine_similarity(a.float(), b.float(), dim=-1).flatten()
                       for a, b in zip(inputs, inputs[1:])])  # (K-1, tokens)
    q = torch.quantile(cos, torch.tensor(quantiles, dtype=cos.dtype, device=cos.device), dim=1)  # (3, K-1)
    return {"p05": q[0], "median": q[1], "p95": q[2]}


@torch.no_grad()
def branch_inputs(model, idx: Tensor) -> list[Tensor]:
    """The (pre-norm) input of every branch of a TransformerLM on ``idx``: ``h`` for plain
    residuals, ``A_m^T H`` for hyper-connections (per token for dynamic ones), ``concat(A_m^T F)``
    for frac-connections."""
    return inputs_from_states(pathway_states(model, idx))


@torch.no_grad()
def inputs_from_states(states: list[PathwayState]) -> list[Tensor]:
    """Branch inputs from :func:`~hyperbit.analysis.connections.pathway_states`."""
    return [st.h if st.alpha is None else
            st.pathway.branch_input(st.h, st.alpha) if isinstance(st.pathway, FracConnection) else
            (st.alpha[..., :, 0, None] * st.h.float()).sum(-2)  # (B, T, d)
            for st in states]


def collapse(model, idx: Tensor) -> dict[str, Tensor]:
    """Median and 5-95% band of consecutive-branch-input cosine similarity, per depth."""
    return consecutive_cosine(branch_inputs(model, idx))

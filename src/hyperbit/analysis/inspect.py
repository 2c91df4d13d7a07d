"""The analyses behind ``hyperbit inspect``: every number of its report, from a model and a batch.

On one batch, in fp32 with the model in eval mode:

- the unfolded connection matrix ``C`` (spec section 5; dynamic HC: the token-averaged weights)
  beside three references of the same size: Pre-Norm, an idealised Post-Norm and the parallel
  n = 2 preset (:func:`reference_matrices`). The learned matrix is only comparable to them
  because all four are unfolded the same way. ``C`` weighs outputs of very different sizes (the
  embedding is usually far smaller than a branch output), so the analysis also gives each
  output's RMS and ``C`` times it, column by column: what each branch input is actually made of;
- representation collapse (spec section 6): cosine of consecutive branch inputs per depth;
- composite gain: largest absolute row / column sum of the product of stream-mixing matrices;
- the gradient norm of every block's attention, FFN and pathway parameters, plus embedding and
  head, from one forward + backward on the batch (no optimizer step; gradients are cleared);
- dynamic HC only: quantiles over tokens of the per-token connection weights, which the token
  average in ``C`` hides.

The model runs twice on the batch: one forward records every pathway's state and connection
weights (the same capture as the training monitors, ``pathway_states``), from which ``C``, the
gain, collapse and the dynamic-weight quantiles all follow; one forward + backward gives the
gradients and the output sizes. :mod:`hyperbit.reports.inspect` turns the result into a report.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..pathways import FracConnection, parallel_matrix
from ._hooks import recording
from .collapse import consecutive_cosine, inputs_from_states
from .connections import (WEIGHTED, BranchWeights, PathwayState, branch_weights_from_states,
                          composite_gain, from_matrix, output_weights, pathway_states, unfold)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_KEYS = ("p05", "p25", "median", "p75", "p95")
WEIGHT_GROUPS = ("a_m_home", "a_m_other", "beta", "a_r_diag", "a_r_offdiag")

REFERENCE_DEFINITIONS = {
    "prenorm": "Pre-Norm h <- h + T(norm(h)): the n = 1 identity connection, unfolded; every branch "
               "and the output read the embedding and every earlier branch output with weight 1.",
    "postnorm": "Post-Norm h <- norm(h + T(h)), idealised as s_k = (s_{k-1} + T_k) / sqrt(2): the "
                "norm of a sum of two equal-norm uncorrelated vectors. Row k (k <= K: branch k's input "
                "s_{k-1}; k = K+1: the output s_K) has c_k0 = 2^{-(k-1)/2} and c_kj = 2^{-(k-j)/2} "
                "for 1 <= j < k. The real Post-Norm rescales by data-dependent norms, so its C is "
                "not defined by fixed weights.",
    "parallel_n2": "The n = 2 parallel preset (spec section 4): unfold of "
                   "parallel_matrix(2, k) for every branch k = 0 .. K-1; branches run in pairs.",
}


# --- references and labels ----------------------------------------------------------------------


def reference_matrices(K: int) -> dict[str, Tensor]:
    """Unfolded ``(K+1, K+1)`` connection matrices of three reference pathways with ``K`` branches
    (layout of :func:`~hyperbit.analysis.connections.unfold`: row ``k-1`` is branch ``k``'s
    input, the last row the output; column 0 the embedding). See :data:`REFERENCE_DEFINITIONS`.

    Post-Norm has no fixed connection weights: each block renormalises ``h + T(h)``. If the two
    summands have equal norm and are uncorrelated, their sum has sqrt(2) times that norm, so the
    norm divides by sqrt(2) and every earlier contribution decays by sqrt(2) per branch. That is
    the idealisation drawn here, a picture of the geometric decay rather than of a real model.
    """
    if K < 1:
        raise ValueError(f"need at least one branch, got K={K}")
    one = torch.ones(1)
    prenorm = unfold([BranchWeights(one, one, one.view(1, 1)) for _ in range(K)])
    postnorm = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    for k in range(1, K + 2):  # k = K + 1 is the output row
        postnorm[k - 1, 0] = 2.0 ** (-(k - 1) / 2)
        for j in range(1, k):
            postnorm[k - 1, j] = 2.0 ** (-(k - j) / 2)
    parallel = unfold([from_matrix(parallel_matrix(2, k)) for k in range(K)])
    return {"prenorm": prenorm, "postnorm": postnorm, "parallel_n2": parallel}


def branch_labels(n_layers: int) -> list[str]:
    """``["emb", "a1", "f1", ..., "aL", "fL"]``: the columns of ``C``; its rows are ``[1:]`` plus
    ``"out"``."""
    return ["emb"] + [f"{kind}{i}" for i in range(1, n_layers + 1) for kind in ("a", "f")]


# --- what is computed ---------------------------------------------------------------------------


@contextmanager
def _output_rms(model: nn.Module) -> Iterator[list[Tensor]]:
    """The RMS over features of every output the residual pathway carries (embedding, then each
    branch in execution order), averaged over the tokens: C's coefficients multiply outputs of
    very different sizes (the embedding is typically far smaller than a branch output)."""
    rms: list[Tensor] = []

    def record(mod, args, output):
        rms.append(output.detach().float().pow(2).mean(-1).sqrt().mean().cpu())

    modules = [model.embed] + [m for block in model.blocks for m in (block.attn, block.ffn)]
    with recording(modules, record):
        yield rms


def _grad_norm(params: list[nn.Parameter]) -> float:
    unique = {id(p): p for p in params if p.grad is not None}
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in unique.values()))


def gradient_norms(model: nn.Module) -> dict[str, Any]:
    """L2 norms of the gradients currently held by ``model`` (after one backward): per block the
    attention, FFN and pathway parameters (the pathway owns the branch norms and, for HC, the
    connection weights), plus embedding, head (None when tied to the embedding), final norm and
    the whole model. Where the gradient vanishes or explodes with depth shows here first."""
    blocks = model.blocks
    tied = model.head.weight is model.embed.weight
    return {
        "attn": [_grad_norm(list(b.attn.parameters())) for b in blocks],
        "ffn": [_grad_norm(list(b.ffn.parameters())) for b in blocks],
        "pathway": [_grad_norm([*b.attn_path.parameters(), *b.ffn_path.parameters()]) for b in blocks],
        "embed": _grad_norm([model.embed.weight]),
        "head": None if tied else _grad_norm([model.head.weight]),
        "final_norm": _grad_norm(list(model.final_norm.parameters())),
        "total": _grad_norm(list(model.parameters())),
        "note": "pathway = both pathways of the block: branch norms and connection weights"
                + ("; head tied to the embedding" if tied else ""),
    }


@torch.no_grad()
def dynamic_weight_quantiles(states: list[PathwayState]) -> dict[str, Any]:
    """Per branch, quantiles over tokens (and entries) of the per-token DHC weights the pathways
    computed in a forward pass (:func:`~hyperbit.analysis.connections.pathway_states`). The token average in ``C`` can hide weights that swing
    widely from token to token; these bands show it.

    Groups: ``beta`` (B entries), ``a_r_diag`` / ``a_r_offdiag`` (A_r), and A_m split the same
    way into ``a_m_home`` (entry ``k mod n``, the stream branch ``k`` reads at init) and
    ``a_m_other``: pooled, the 1s and 0s of A_m's init would make one band from 0 to 1 that says
    nothing about the tokens. The ``other`` groups are None for n = 1. Frac-connections (A_m is
    m x m): ``a_m_home`` is A_m's diagonal (fraction i of the input read from fraction i),
    ``a_m_other`` the rest."""
    per_group: dict[str, list[np.ndarray]] = {g: [] for g in WEIGHT_GROUPS}
    for st in states:
        p, n = st.pathway, st.pathway.expansion_rate
        alpha, beta = st.alpha, st.beta  # (B, T, n, n+1), (B, T, n)
        if isinstance(p, FracConnection):  # (B, T, m, 2m): A_m is m x m, home = its diagonal
            n = p.frac_rate
            alpha = alpha.reshape(-1, n, 2 * n).double().cpu()
            a_m, a_r = alpha[:, :, :n], alpha[:, :, n:]
            off = ~torch.eye(n, dtype=torch.bool)
            a_m_home, a_m_other = a_m.diagonal(dim1=-2, dim2=-1), a_m[:, off]
        else:
            alpha = alpha.reshape(-1, n, n + 1).double().cpu()
            a_m, a_r = alpha[:, :, 0], alpha[:, :, 1:]
            home = torch.arange(n) == p.branch_index % n
            off = ~torch.eye(n, dtype=torch.bool)
            a_m_home, a_m_other = a_m[:, home], a_m[:, ~home]
        values = {"a_m_home": a_m_home, "a_m_other": a_m_other,
                  "beta": beta.reshape(-1, n).double().cpu(),
                  "a_r_diag": a_r.diagonal(dim1=-2, dim2=-1), "a_r_offdiag": a_r[:, off]}
        for g, v in values.items():
            if v.numel():
                per_group[g].append(np.quantile(v.flatten().numpy(), QUANTILES))
    out: dict[str, Any] = {"quantiles": list(QUANTILES)}
    for g, rows in per_group.items():
        q = np.stack(rows, axis=1) if rows else None  # (5, K)
        out[g] = None if q is None else {key: floats(q[i]) for i, key in enumerate(QUANTILE_KEYS)}
    return out


def analyse(model: nn.Module, idx: Tensor, targets: Tensor) -> dict[str, Any]:
    """Every number of the report for ``model`` on one batch (``idx``, next-token ``targets``).

    Post-Norm gets no learned ``C`` and no composite gain: its connections are renormalisations
    that depend on the data, not weights (``model_branch_weights`` would report the Pre-Norm
    pattern for it, which is wrong). The model is left in eval mode with no gradients (any it
    held are discarded)."""
    model.eval()
    cfg = model.cfg
    pathways = model.pathways()
    dynamic = any(isinstance(p, WEIGHTED) and p.dynamic for p in pathways)
    postnorm = cfg.pathway == "postnorm"
    out: dict[str, Any] = {}
    states = pathway_states(model, idx)  # one forward: the connection weights and branch inputs
    if postnorm:
        reason = "Post-Norm renormalises h + T(h) after every branch: no fixed connection weights"
        out["connection_matrix"] = {"C": None, "reason": reason, "token_average": False}
        out["composite_gain"] = {"row": None, "col": None, "max": None, "reason": reason}
    else:
        branches = branch_weights_from_states(states)
        C = unfold(branches, output_weights(pathways))
        out["connection_matrix"] = {"C": [floats(r) for r in C], "reason": None, "token_average": dynamic}
        rows, cols = composite_gain(branches)
        out["composite_gain"] = {"row": floats(rows), "col": floats(cols),
                                 "max": num(max(rows.max(), cols.max())), "reason": None}
    c = consecutive_cosine(inputs_from_states(states))
    out["collapse"] = {key: floats(c[key]) for key in ("median", "p05", "p95")}
    with _output_rms(model) as rms, torch.enable_grad():
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
    out["loss"] = num(loss.detach())
    out["output_rms"] = floats(torch.stack(rms))
    if not postnorm:  # what row k actually sums: coefficient x the size of what it weights
        out["connection_matrix"]["C_times_rms"] = [floats(r) for r in C.cpu() * torch.stack(rms).double()]
    out["grad_norm"] = gradient_norms(model)
    model.zero_grad(set_to_none=True)
    out["dynamic_weights"] = dynamic_weight_quantiles(states) if dynamic else None
    return out

def num(x: Any) -> float | None:
    """A JSON-safe float: non-finite values (a diverged run) become null instead of invalid JSON."""
    v = float(x)
    return v if math.isfinite(v) else None


def floats(t: Tensor | np.ndarray) -> list[float | None]:
    return [num(v) for v in np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t).ravel()]

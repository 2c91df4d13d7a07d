"""Training monitors: composite gain and representation collapse from one small forward pass.

``hyperbit train`` calls :func:`pathway_summary` every ``train.monitor_every`` steps on a fixed
validation batch (the first :data:`MONITOR_WINDOWS` validation windows of ``train.seq_len``
tokens) and logs the result to ``metrics.jsonl`` as ``{"step": s, "monitor": {...}}``. One
no-grad forward over a couple of windows costs a fraction of one training step, so the monitors
can stay on by default.

Dynamic hyper-connections compute their weights per token, so the gain is that of the weights
averaged over the batch's tokens: ``hyperbit inspect`` (``--batch-size`` windows, default 8)
averages over more tokens and gives a slightly different gain for the same checkpoint.

Everything is computed on the device of ``idx`` (the model's): the connection weights of plain
residual pathways, made on the CPU, are moved there, and the statistics come back to the host in
one copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pathways import PostNorm
from .collapse import consecutive_cosine, inputs_from_states
from .connections import BranchWeights, branch_weights_from_states, composite_gain, pathway_states

#: validation windows in the batch the training monitors read
MONITOR_WINDOWS = 2


@torch.no_grad()
def pathway_summary(model, idx: Tensor) -> dict[str, list[float] | None]:
    """Per depth: ``gain_row`` / ``gain_col`` (largest absolute row / column sum of the product of
    the stream-mixing matrices up to that branch; 1 for Pre-Norm; None for a model with Post-Norm
    pathways, which renormalise after every branch and so have no fixed connection weights) and
    the collapse statistics ``collapse_median`` / ``collapse_p05`` / ``collapse_p95`` (cosine of
    consecutive branch inputs over the tokens of ``idx``)."""
    was_training = model.training
    model.eval()
    try:
        states = pathway_states(model, idx)
    finally:
        model.train(was_training)
    cos = consecutive_cosine(inputs_from_states(states))
    device = cos["median"].device  # where the model ran
    values = {"collapse_median": cos["median"], "collapse_p05": cos["p05"], "collapse_p95": cos["p95"]}
    out: dict[str, list[float] | None] = {"gain_row": None, "gain_col": None}
    if not any(isinstance(st.pathway, PostNorm) for st in states):
        branches = [BranchWeights(*(t.to(device) for t in (b.beta, b.a_m, b.a_r)))
                    for b in branch_weights_from_states(states)]
        values["gain_row"], values["gain_col"] = composite_gain(branches)
    names = list(values)
    host = torch.cat([values[name].double().flatten() for name in names]).cpu()  # one copy to the host
    for name, part in zip(names, host.split([values[name].numel() for name in names])):
        out[name] = [round(v, 6) for v in part.tolist()]
    return out

"""Training monitors: composite gain and representation collapse from one small forward pass.

``hyperbit train`` calls :func:`pathway_summary` every ``train.monitor_every`` steps on a fixed
validation batch and logs the result to ``metrics.jsonl`` as ``{"step": s, "monitor": {...}}``.
One no-grad forward over a couple of windows costs a fraction of one training step, so the
monitors can stay on by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .collapse import consecutive_cosine, inputs_from_states
from .connections import branch_weights_from_states, composite_gain, pathway_states


@torch.no_grad()
def pathway_summary(model, idx: Tensor) -> dict[str, list[float]]:
    """Per depth: ``gain_row`` / ``gain_col`` (largest absolute row / column sum of the product of
    the stream-mixing matrices up to that branch; 1 for plain residuals) and the collapse
    statistics ``collapse_median`` / ``collapse_p05`` / ``collapse_p95`` (cosine of consecutive
    branch inputs over the tokens of ``idx``)."""
    was_training = model.training
    model.eval()
    try:
        states = pathway_states(model, idx)
    finally:
        model.train(was_training)
    rows, cols = composite_gain(branch_weights_from_states(states))
    cos = consecutive_cosine(inputs_from_states(states))
    values = {"gain_row": rows, "gain_col": cols, "collapse_median": cos["median"],
              "collapse_p05": cos["p05"], "collapse_p95": cos["p95"]}
    return {name: [round(float(v), 6) for v in t] for name, t in values.items()}

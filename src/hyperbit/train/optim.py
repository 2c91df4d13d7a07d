"""Optimizer parameter groups that respect what must not be weight-decayed.

Modules declare their own exceptions with ``no_weight_decay() -> set[str]`` (local parameter
names): static hyper-connection weights and gains, and every norm gain, are not decayed; dynamic
HC projections, linears and embeddings are (spec section 2).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.norm import RMSNorm


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, named ``"decay"`` (weight decay ``wd``) and ``"no_decay"`` (0.0)."""
    no_decay: set[int] = set()
    for module in model.modules():
        names = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
        if isinstance(module, RMSNorm) and module.weight is not None:
            names = names | {"weight"}
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                no_decay.add(id(param))
    decay, keep = [], []
    for param in dict.fromkeys(p for p in model.parameters() if p.requires_grad):
        (keep if id(param) in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)

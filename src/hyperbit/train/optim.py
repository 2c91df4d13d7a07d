"""Optimizer parameter groups that respect what must not be weight-decayed.

Modules declare their own exceptions with ``no_weight_decay() -> set[str]`` (local parameter
names): static hyper-connection weights and gains, and every norm gain, are not decayed; dynamic
HC projections, linears and embeddings are (spec section 2).

On CUDA the optimizer is AdamW's fused implementation (one kernel for every parameter, and with
an fp16 gradient scaler no host synchronisation per step); elsewhere PyTorch's default (foreach).
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


#: parameter dtypes fused AdamW updates on CUDA
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_supported(params) -> bool:
    """Whether fused AdamW can update ``params``: every one on CUDA, in a dtype it supports."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.dtype in FUSED_DTYPES for p in params)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused where :func:`fused_supported` (CUDA)."""
    groups = param_groups(model, weight_decay)
    fused = fused_supported(p for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

"""Gated feed-forward networks: SwiGLU and squared-ReLU (BitNet b1.58 2B4T), no biases."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .linear import fused_linear, make_linear
from .norm import RMSNorm


class FeedForward(nn.Module):
    """``down_proj(sub_norm?(act(gate_proj x) * up_proj x))`` with act = SiLU or ReLU².

    ``gate_proj`` and ``up_proj`` stay separate modules (checkpoint layout, one BitNet weight scale
    each) and are computed with one matmul (:func:`~hyperbit.nn.linear.fused_linear`)."""

    output_projection = "down_proj"  # what writes into the residual pathway (hyperbit.nn.branch)

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu", linear: str = "fp",
                 subln: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        if kind not in ("swiglu", "relu2"):
            raise ValueError(f"ffn={kind!r} is not allowed; choose one of ['swiglu', 'relu2']")
        self.kind = kind
        self.gate_proj = make_linear(linear, dim, hidden)
        self.up_proj = make_linear(linear, dim, hidden)
        self.ffn_sub_norm = RMSNorm(hidden, norm_eps) if subln else None
        self.down_proj = make_linear(linear, hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = fused_linear([self.gate_proj, self.up_proj], x)  # (B, T, hidden) each
        act = F.silu(gate) if self.kind == "swiglu" else F.relu(gate).square()
        hidden = act * up
        if self.ffn_sub_norm is not None:
            hidden = self.ffn_sub_norm(hidden)
        return self.down_proj(hidden)

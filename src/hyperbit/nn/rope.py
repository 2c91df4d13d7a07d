"""Rotary position embeddings (half-split convention, as in LLaMA / Hugging Face)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_seq_len)

    def _build(self, seq_len: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
        angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """q: (B, Hq, T, hd), k: (B, Hkv, T, hd); positions start at ``start`` (KV-cache decoding)."""
        end = start + q.shape[-2]
        if end > self.cos.shape[0] or self.cos.device != q.device:
            self._build(max(end, self.cos.shape[0]), q.device)
        cos, sin = self.cos[start:end].to(q.dtype), self.sin[start:end].to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin

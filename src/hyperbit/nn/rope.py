"""Rotary position embeddings (half-split convention, as in LLaMA / Hugging Face).

For ``x = [x1, x2]`` (the two halves of the head dimension) and the angle table ``a`` of a
position: ``rope(x) = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]``, i.e. the Hugging Face form
``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` repeated over both halves. The model keeps
one table for all its layers (:class:`~hyperbit.models.TransformerLM` shares it); the tables are
non-persistent buffers (recomputed, never stored in a checkpoint).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for RoPE")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)  # (T, head_dim / 2), fp32
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_seq_len)

    def _build(self, seq_len: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
        angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hd/2)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        """q: (B, Hq, T, hd), k: (B, Hkv, T, hd); positions start at ``start`` (KV-cache decoding).
        Returns contiguous tensors of the dtype of q / k."""
        end = start + q.shape[-2]
        if end > self.cos.shape[0] or self.cos.device != q.device:
            self._build(max(end, self.cos.shape[0]), q.device)
        cos, sin = self.cos[start:end], self.sin[start:end]  # (T, hd/2) views
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x: (..., T, hd)`` rotated by the half tables ``cos, sin: (T, hd/2)`` (cast to x's dtype).

    Eager mode runs a hand-written autograd node (two fused passes over x each way, nothing saved
    but the tables); under ``torch.compile`` the plain formula, which the compiler fuses itself."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return _Rope.apply(x, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """``[x1 cos - sign x2 sin, x2 cos + sign x1 sin]`` into a new contiguous tensor; sign -1 is
    the inverse rotation (the transpose, used by the backward)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None

"""Causal self-attention with grouped-query heads, RoPE and ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .linear import make_linear
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Attention(nn.Module):
    """``o_proj(sub_norm?(SDPA(rope(q_proj x), rope(k_proj x), v_proj x)))``; no biases.

    Projections are separate (not fused) so a ternary model keeps one weight scale per original
    projection and the parameter names match the Hugging Face LLaMA / BitNet layout.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, max_seq_len: int,
                 rope_theta: float = 10000.0, linear: str = "fp", subln: bool = False,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = make_linear(linear, dim, n_heads * self.head_dim)
        self.k_proj = make_linear(linear, dim, n_kv_heads * self.head_dim)
        self.v_proj = make_linear(linear, dim, n_kv_heads * self.head_dim)
        self.attn_sub_norm = RMSNorm(dim, norm_eps) if subln else None
        self.o_proj = make_linear(linear, n_heads * self.head_dim, dim)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, d)
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)

"""Causal self-attention with grouped-query heads, RoPE and ``scaled_dot_product_attention``,
plus the key/value cache used for incremental decoding (:class:`KVCache`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import fused_linear, make_linear
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Attention(nn.Module):
    """``o_proj(sub_norm?(SDPA(rope(q_proj x), rope(k_proj x), v_proj x)))``; no biases.

    The projections are separate modules, so a ternary model keeps one weight scale per original
    projection and the parameter names match the Hugging Face LLaMA / BitNet layout; q, k and v are
    computed with one matmul (:func:`~hyperbit.nn.linear.fused_linear`). ``rope`` shares one
    rotary table between layers (the model passes its own); without it the layer builds one.
    """

    output_projection = "o_proj"  # what writes into the residual pathway (hyperbit.nn.branch)

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, max_seq_len: int,
                 rope_theta: float = 10000.0, linear: str = "fp", subln: bool = False,
                 norm_eps: float = 1e-6, causal: bool = True, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.causal = causal  # False: every token sees every token (a vision transformer)
        self.q_proj = make_linear(linear, dim, n_heads * self.head_dim)
        self.k_proj = make_linear(linear, dim, n_kv_heads * self.head_dim)
        self.v_proj = make_linear(linear, dim, n_kv_heads * self.head_dim)
        self.attn_sub_norm = RMSNorm(dim, norm_eps) if subln else None
        self.o_proj = make_linear(linear, n_heads * self.head_dim, dim)
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim={rope.head_dim} does not match head_dim={self.head_dim}")
        self.rope = rope if rope is not None else RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def forward(self, x: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        """x: (B, T, d). With ``cache`` the T tokens sit at positions ``cache.pos .. cache.pos+T-1``:
        their keys/values are appended to the cache and they attend to every cached key (causally
        within the chunk). Without a cache the T tokens are a whole sequence from position 0."""
        B, T, _ = x.shape
        q, k, v = fused_linear([self.q_proj, self.k_proj, self.v_proj], x)  # (B, T, H * hd) each
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            q, k = self.rope(q, k)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)
        else:
            if not self.causal:
                raise ValueError("a KV cache is for causal decoding; this attention is bidirectional")
            start = cache.pos
            q, k = self.rope(q, k, start)
            k, v = cache.update(k, v)  # (B, Hkv, start+T, hd): everything cached so far
            if T == 1:  # one new token sees every cached key
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            elif start == 0:  # a prompt into an empty cache: the plain causal square
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:  # a chunk after cached tokens: query i sees keys 0 .. start+i (bottom-right causal)
                mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, d)
        if self.attn_sub_norm is not None:
            out = self.attn_sub_norm(out)
        return self.o_proj(out)


class LayerKVCache:
    """One attention layer's keys and values: preallocated ``(B, Hkv, max_len, head_dim)`` tensors
    (allocated on the first :meth:`update`, in the dtype / device of the keys) and the fill
    position ``pos`` = number of tokens cached = position of the next token."""

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len, self.pos = max_len, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v: (B, Hkv, T, hd)`` and return views of all cached keys and values."""
        B, H, T, hd = k.shape
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} cached + {T} new tokens > max_len={self.max_len}")
        if self.k is None:
            self.k = k.new_empty(B, H, self.max_len, hd)
            self.v = v.new_empty(B, H, self.max_len, v.shape[-1])
        elif self.k.shape[0] != B or self.k.shape[1] != H or self.k.shape[3] != hd:
            raise ValueError(f"KV cache holds (B, Hkv, hd) = {(self.k.shape[0], self.k.shape[1], self.k.shape[3])}, "
                             f"got {(B, H, hd)}")
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Key/value caches for a whole model: ``layers[i]`` belongs to block i's attention. Pass it to
    ``TransformerLM.forward(idx, cache=...)``; positions continue from :attr:`pos`."""

    def __init__(self, n_layers: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layers)]
        self.max_len = max_len

    @property
    def pos(self) -> int:
        return self.layers[0].pos if self.layers else 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

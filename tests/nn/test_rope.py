"""RoPE: the hand-written rotation against the Hugging Face formula (forward, backward, offsets,
dtypes), the compiled-mode formula against the eager one, and one table per model with the
checkpoint layout unchanged."""

from __future__ import annotations

import pytest
import torch

import hyperbit as hb
from hyperbit.nn import Attention
from hyperbit.nn.rope import RotaryEmbedding, apply_rope


def hf_rope(x: torch.Tensor, start: int, theta: float = 10000.0) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (transformers' LLaMA), angles in fp64."""
    hd, T = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(start, start + T, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * ang.sin().to(x.dtype)


@pytest.mark.parametrize("start", [0, 5])
def test_rotation_equals_the_hugging_face_formula_forward_and_backward(start):
    rope = RotaryEmbedding(16, 8, theta=500.0).double()
    g = torch.Generator().manual_seed(0)
    # q as the attention makes it: a transposed view of a (B, T, H, hd) projection output
    q = torch.randn(2, 7, 3, 16, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 1, 7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    q_rot, k_rot = rope(q, k, start)  # positions up to 11 > max_seq_len 8: the table grows
    assert q_rot.is_contiguous() and rope.cos.shape[0] == max(8, start + 7)
    # fp32 tables (cast to fp64 by .double() only for the positions built at init)
    torch.testing.assert_close(q_rot, hf_rope(q, start, 500.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(k_rot, hf_rope(k, start, 500.0), rtol=0, atol=1e-6)
    gq, gk = torch.randn(q_rot.shape, generator=g, dtype=torch.float64), torch.randn(k_rot.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad([q_rot, k_rot], [q, k], [gq, gk])
    want = torch.autograd.grad([hf_rope(q, start, 500.0), hf_rope(k, start, 500.0)], [q, k], [gq, gk])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_backward_is_the_exact_adjoint():
    """gradcheck in fp64 against finite differences of the same (fp64) tables."""
    cos, sin = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_in_its_dtype_and_close(dtype):
    rope = RotaryEmbedding(32, 16)
    x = torch.randn(2, 4, 16, 32, generator=torch.Generator().manual_seed(0))
    q, k = rope(x.to(dtype), x.to(dtype))
    assert q.dtype == dtype and k.dtype == dtype
    # a few roundings of values up to ~4 (bf16 spacing 2^-6 there)
    torch.testing.assert_close(q.float(), hf_rope(x.double(), 0).float(), rtol=0, atol=4e-2)
    torch.testing.assert_close(q, hf_rope(x.to(dtype), 0), rtol=0, atol=4e-2)


def test_compiled_formula_equals_the_eager_node(monkeypatch):
    """Under torch.compile the plain formula runs (the compiler fuses it): same numbers."""
    cos, sin = torch.rand(6, 8), torch.rand(6, 8)
    x = torch.randn(2, 3, 6, 16, requires_grad=True)
    g = torch.randn(2, 3, 6, 16)
    eager = apply_rope(x, cos, sin)
    (ge,) = torch.autograd.grad(eager, x, g)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plain = apply_rope(x, cos, sin)
    assert plain.grad_fn.name() != eager.grad_fn.name()
    (gp,) = torch.autograd.grad(plain, x, g)
    torch.testing.assert_close(plain, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(gp, ge, rtol=0, atol=1e-6)


def test_one_table_per_model_and_the_checkpoint_keys_unchanged():
    cfg = hb.ModelConfig(vocab_size=32, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = hb.build_model(cfg)
    ropes = {id(b.attn.rope) for b in model.blocks}
    assert ropes == {id(model.rope)}
    tables = [t for n, t in model.named_buffers() if n.endswith((".cos", ".sin")) or n in ("rope.cos", "rope.sin")]
    assert len(tables) == 2  # one cos, one sin for the whole model
    # The tables were never in the state_dict (non-persistent): checkpoints of models with one
    # table per layer carry exactly these keys, so they load with strict=True.
    keys = set(model.state_dict())
    assert not any("rope" in k or k.endswith((".cos", ".sin")) for k in keys)
    per_layer = hb.build_model(cfg)
    for b in per_layer.blocks:  # the former layout: every attention with its own table
        b.attn.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    del per_layer.rope
    assert set(per_layer.state_dict()) == keys
    model.load_state_dict(per_layer.state_dict(), strict=True)
    idx = torch.randint(0, 32, (2, 9))
    torch.testing.assert_close(model(idx)[0], per_layer(idx)[0], rtol=0, atol=0)
    # moving the model moves the one table every layer reads
    model.to(torch.float64)
    assert all(b.attn.rope.cos.dtype == torch.float64 for b in model.blocks)


def test_a_shared_table_of_the_wrong_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim"):
        Attention(32, 4, 4, 16, rope=RotaryEmbedding(16, 16))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 16)


def test_module_has_no_per_call_table_rebuild(monkeypatch):
    rope = RotaryEmbedding(8, 32)
    calls = []
    original = rope._build
    monkeypatch.setattr(rope, "_build", lambda *a: calls.append(a) or original(*a))
    x = torch.randn(1, 2, 10, 8)
    for start in (0, 3, 22):
        rope(x, x, start)
    assert calls == []  # the table is sliced, not rebuilt
    rope(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
    assert len(calls) == 1 and calls[0][0] == 40 and rope.cos.shape == (40, 4)  # only a longer sequence

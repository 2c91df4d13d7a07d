"""fused_linear: several projections of one input as one matmul, equal to separate calls in the
forward and in every gradient (fp and BitNet linears, fp32, bf16 and fp16 autocast, bf16
parameters, fp16 parameters under bf16 autocast), the
activation quantised once, and the fallbacks; Attention and FeedForward use it.

Tolerances (relative to the largest magnitude of the reference tensor): fp32 1e-5 (one GEMM over
the concatenated weight sums in another order than three), bf16 1e-2 (an output or a gradient may
round to the neighbouring bf16 value: 2^-8 relative), fp16 2e-3 (2^-11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyperbit.nn.bitlinear as bitlinear
from hyperbit.nn import Attention, BitLinear, FeedForward
from hyperbit.nn.linear import fused_linear, make_linear

TOL = {"fp32": 1e-5, "autocast": 1e-2, "autocast_fp16": 2e-3, "bf16": 1e-2, "fp16_autocast": 1e-2}
OUT = (48, 16, 16)  # q, k, v widths of a GQA layer with 3 query heads per key head


def close(got, want, tol, msg=""):
    scale = want.detach().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale, msg=msg)


def layers(kind: str, dtype, seed=0):
    torch.manual_seed(seed)
    ls = [make_linear(kind, 32, n).to(dtype) for n in OUT]
    with torch.no_grad():
        for m in ls:  # different magnitudes: each weight scale must be its own
            m.weight.mul_(torch.rand(()) * 4 + 0.1)
    return ls


def run(ls, x, fused: bool, precision: str):
    x = x.detach().clone().requires_grad_()
    for m in ls:
        m.weight.grad = None
    ctx = (torch.autocast("cpu", torch.bfloat16) if precision in ("autocast", "fp16_autocast") else
           torch.autocast("cpu", torch.float16) if precision == "autocast_fp16" else torch.autocast("cpu", enabled=False))
    with ctx:
        outs = fused_linear(ls, x) if fused else [m(x) for m in ls]
    g = torch.Generator().manual_seed(1)
    sum(((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)).backward()
    return [o.detach() for o in outs], x.grad, [m.weight.grad.clone() for m in ls]


@pytest.mark.parametrize("precision", ["fp32", "autocast", "autocast_fp16", "bf16", "fp16_autocast"])
@pytest.mark.parametrize("kind", ["fp", "bitnet"])
def test_fused_equals_separate_calls_forward_and_every_gradient(kind, precision):
    # fp16_autocast: fp16 parameters under bf16 autocast (autocast's cat refuses that mix on CPU)
    dtype = {"bf16": torch.bfloat16, "fp16_autocast": torch.float16}.get(precision, torch.float32)
    ls = layers(kind, dtype)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, 0, 3] = 9.0  # one outlier token: per-token activation scales differ
    outs, gx, gws = run(ls, x, fused=True, precision=precision)
    ref_outs, ref_gx, ref_gws = run(ls, x, fused=False, precision=precision)
    tol = TOL[precision]
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.shape == r.shape and o.dtype == r.dtype
        close(o, r, tol, f"output {i}")
    close(gx, ref_gx, tol, "grad x")
    for i, (g, r) in enumerate(zip(gws, ref_gws)):
        assert g.dtype == dtype
        close(g, r, tol, f"grad weight {i}")


def test_bitnet_fused_keeps_one_weight_scale_per_projection():
    """Each output equals x_q @ W_q^T with W_q from that projection's own absmean scale (spec
    bitnet.md section 1), independently of the module code."""
    ls = layers("bitnet", torch.float32)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    outs = fused_linear(ls, x)
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=bitlinear.EPS)
    xq = (x * s).round().clamp(-128, 127) / s
    for o, m in zip(outs, ls):
        gamma = m.weight.abs().mean().clamp(min=bitlinear.EPS)
        wq = (m.weight / gamma).round().clamp(-1, 1) * gamma
        close(o, xq @ wq.detach().T, 1e-6)
    gammas = [m.weight.abs().mean().item() for m in ls]
    assert max(gammas) > 2 * min(gammas)  # one shared scale would be visibly wrong


def test_bitnet_activation_is_quantised_once(monkeypatch):
    calls = []
    original = bitlinear.quantize_activation
    monkeypatch.setattr(bitlinear, "quantize_activation", lambda x: calls.append(x.shape) or original(x))
    ls = layers("bitnet", torch.float32)
    x = torch.randn(3, 32)
    fused_linear(ls, x)
    assert len(calls) == 1
    [m(x) for m in ls]
    assert len(calls) == 1 + len(ls)  # the counter sees separate calls


def test_bitnet_quant_strength_blend_is_fused_and_mixed_strengths_fall_back(monkeypatch):
    ls = layers("bitnet", torch.float32)
    x = torch.randn(4, 32)
    for m in ls:
        m.quant_strength = 0.4
    for o, m in zip(fused_linear(ls, x), ls):
        close(o, m(x), 1e-5)
    ls[1].quant_strength = 0.7
    calls = []
    original = bitlinear.quantize_activation
    monkeypatch.setattr(bitlinear, "quantize_activation", lambda x: calls.append(1) or original(x))
    outs = fused_linear(ls, x)
    assert len(calls) == len(ls)  # separate calls: each blends its own activation
    for o, m in zip(outs, ls):
        torch.testing.assert_close(o, m(x), rtol=0, atol=0)


class _Doubler(nn.Module):
    """A layer type of the protocol: ``fused_forward(layers, x)`` is called for a group of it."""

    calls = 0

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k

    @classmethod
    def fused_forward(cls, layers, x):
        cls.calls += 1
        return tuple(x * m.k for m in layers)


def test_protocol_and_fallbacks():
    x = torch.randn(2, 8)
    # a type with fused_forward: one call, its outputs as a list
    _Doubler.calls = 0
    outs = fused_linear([_Doubler(2), _Doubler(3)], x)
    assert _Doubler.calls == 1 and isinstance(outs, list)
    torch.testing.assert_close(outs[1], 3 * x)
    # mixed types, a biased Linear, a Linear subclass without fused_forward: separate calls
    torch.manual_seed(0)
    for group in ([nn.Linear(8, 4, bias=False), BitLinear(8, 4)],
                  [nn.Linear(8, 4, bias=True), nn.Linear(8, 4, bias=True)],
                  [type("MyLinear", (nn.Linear,), {})(8, 4, bias=False)] * 2):
        outs = fused_linear(group, x)
        for o, m in zip(outs, group):
            torch.testing.assert_close(o, m(x), rtol=0, atol=0)
    # a forward hook on one layer: the fused call would skip it, so separate calls
    group = [nn.Linear(8, 4, bias=False), nn.Linear(8, 6, bias=False)]
    seen = []
    group[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    fused_linear(group, x)
    assert seen == [torch.Size([2, 6])]


def test_plain_linear_group_is_one_matmul(monkeypatch):
    calls = []
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or original(x, w, b))
    ls = layers("fp", torch.float32)
    x = torch.randn(3, 32)
    outs = fused_linear(ls, x)
    assert calls == [(sum(OUT), 32)]
    for o, m in zip(outs, ls):
        close(o, x @ m.weight.detach().T, 1e-6)


# --------------------------------------------------------------------------------------------
# The branches use it: Attention (q, k, v) and FeedForward (gate, up) against references written
# with separate projections.
# --------------------------------------------------------------------------------------------

def _rope_reference(x, start=0, theta=10000.0, table_dtype=torch.float32):
    """Hugging Face form: x * cos + rotate_half(x) * sin with the angles computed in
    ``table_dtype`` (the module's tables are fp32)."""
    hd, T = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=table_dtype) / hd)
    ang = torch.outer(torch.arange(start, start + T, dtype=table_dtype), inv)
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * ang.sin().to(x.dtype)


@pytest.mark.parametrize("kind", ["fp", "bitnet"])
def test_attention_equals_separate_projection_reference(kind, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, n_heads=4, n_kv_heads=2, max_seq_len=16, linear=kind).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    B, T, hd = 2, 6, 8
    q = attn.q_proj(x).view(B, T, 4, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, 2, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 2, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(_rope_reference(q), _rope_reference(k), v, is_causal=True, enable_gqa=True)
    ref = attn.o_proj(y.transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *attn.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    calls = []
    monkeypatch.setattr("hyperbit.nn.attention.fused_linear", lambda ls, x: calls.append(len(ls)) or [m(x) for m in ls])
    attn(x)
    assert calls == [3]


@pytest.mark.parametrize("ffn", ["swiglu", "relu2"])
@pytest.mark.parametrize("kind", ["fp", "bitnet"])
def test_feed_forward_equals_separate_projection_reference(kind, ffn, monkeypatch):
    torch.manual_seed(0)
    mod = FeedForward(32, 64, ffn, linear=kind, subln=kind == "bitnet").double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    out = mod(x)
    gate = mod.gate_proj(x)
    act = F.silu(gate) if ffn == "swiglu" else F.relu(gate) ** 2
    hidden = act * mod.up_proj(x)
    if mod.ffn_sub_norm is not None:
        hidden = mod.ffn_sub_norm(hidden)
    ref = mod.down_proj(hidden)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, *mod.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mod.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    calls = []
    monkeypatch.setattr("hyperbit.nn.ffn.fused_linear", lambda ls, x: calls.append(len(ls)) or [m(x) for m in ls])
    mod(x)
    assert calls == [2]

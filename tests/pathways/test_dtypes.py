"""bf16 and fp16 parameters for every pathway: forward, backward and generation run, with and
without autocast; logits and gradients stay close to the same model in fp32; gradients come back
in the parameter dtype; hyper-connections compute in fp32 and round once to the streams' dtype.

Tolerances are relative L2 errors against the fp32 model, in units of the low-precision dtype's
unit round-off u (bf16 2^-8, fp16 2^-11; under bf16 autocast, bf16's): logits <= 4u, gradients
<= 24u (all parameters' gradients as one vector) for full-precision linears. BitNet linears
quantise activations to int8 from their absmax, so a rounding difference of the input flips
whole quantisation steps: their bound is 0.1 on logits and 0.2 on gradients, and Pre-Norm, which
needs no fix, sits at the same ~0.05 as the hyper-connection pathways.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hyperbit as hb
from hyperbit.models import generate, generate_with_logits
from hyperbit.pathways import HyperConnection

torch.set_default_dtype(torch.float32)

PATHWAYS = {
    "prenorm": dict(pathway="prenorm"),
    "postnorm": dict(pathway="postnorm"),
    "hc-static-2": dict(pathway="hc", expansion_rate=2, hc_dynamic=False),
    "hc-dynamic-4": dict(pathway="hc", expansion_rate=4, hc_dynamic=True),
    "sequential": dict(pathway="sequential", expansion_rate=2),
    "parallel-2": dict(pathway="parallel", expansion_rate=2),
}
CASES = [(name, linear) for linear in ("fp", "bitnet") for name in PATHWAYS]
LOW = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tiny_model(linear: str, **kw) -> hb.TransformerLM:
    """fp32, with live connection weights (random static part, non-zero dynamic weights)."""
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=32, linear=linear, **kw)
    torch.manual_seed(0)
    model = hb.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_scale"):
                p.fill_(0.5)
            elif "static_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "dynamic_" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def batch(B=2, T=12, seed=0):
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))
    return idx, idx.roll(-1, 1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,linear", CASES)
def test_low_precision_parameters_forward_backward(name, linear, dtype, autocast):
    ref = tiny_model(linear, **PATHWAYS[name])
    idx, tgt = batch()
    logits_ref, loss_ref = ref(idx, tgt)
    loss_ref.backward()
    model = copy.deepcopy(ref).to(dtype)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, tgt)
    loss.backward()
    assert logits.dtype == (torch.bfloat16 if autocast else dtype)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    params = list(model.named_parameters())
    assert len(params) == len(list(ref.parameters()))
    for pname, p in params:
        assert p.dtype == dtype and p.grad is not None, pname
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all(), pname
    u = UNIT_ROUNDOFF[torch.bfloat16 if autocast else dtype]
    tol_logits, tol_grads = (4 * u, 24 * u) if linear == "fp" else (0.1, 0.2)
    assert rel_err(logits, logits_ref) <= tol_logits
    grads = torch.cat([p.grad.flatten().double() for _, p in params])
    grads_ref = torch.cat([p.grad.flatten().double() for p in ref.parameters()])
    assert rel_err(grads, grads_ref) <= tol_grads


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,linear", CASES)
def test_low_precision_parameters_generate(name, linear, dtype, autocast):
    ref = tiny_model(linear, **PATHWAYS[name])
    model = copy.deepcopy(ref).to(dtype)
    prompt = batch(T=5)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, logits = generate_with_logits(model, prompt, 6, temperature=0)
        sampled = generate(model, prompt, 6, temperature=1.0, use_cache=False,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == sampled.shape == (2, 11)
    assert torch.equal(out[:, :5], prompt) and torch.equal(sampled[:, :5], prompt)
    assert torch.isfinite(logits).all()
    # the first step reads the same prompt as the fp32 model: its logits are close to those
    with torch.no_grad():
        first_ref = ref(prompt)[0][:, -1]
    tol = 4 * UNIT_ROUNDOFF[torch.bfloat16 if autocast else dtype] if linear == "fp" else 0.1
    assert rel_err(logits[:, 0], first_ref) <= tol


def _live_hc(n=4, d=64, dynamic=True):
    torch.manual_seed(0)
    hc = HyperConnection(d, n, branch_index=1, dynamic=dynamic)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return hc


@pytest.mark.parametrize("grad", [True, False], ids=["fused", "no_grad"])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_connections_are_computed_in_fp32_and_rounded_once(dtype, dynamic, grad):
    """With bf16 / fp16 parameters and streams, the branch input and the mixed streams are the
    exact values (fp64 from the same rounded numbers) rounded once: equal to the correctly
    rounded value except where fp32 round-off lands on the other side of a rounding boundary.
    Computing in the low dtype would be off by several units in the last place in many places."""
    low = _live_hc(dynamic=dynamic).to(dtype)
    H = torch.randn(2, 6, 4, 64).to(dtype)
    exact = copy.deepcopy(low).double()
    with torch.set_grad_enabled(grad):
        x, ctx = low.width_connection(H.requires_grad_(grad))
        out = low.depth_connection(ctx, torch.zeros_like(x))
    with torch.no_grad():
        x_exact, ctx_exact = exact.width_connection_reference(H.double())
    assert x.dtype == out.dtype == dtype and ctx.mixed.dtype == torch.float32
    for got, want in ((x, x_exact), (out, ctx_exact.mixed)):
        rounded = want.to(dtype)
        wrong = got != rounded
        assert wrong.float().mean() <= 0.01, float(wrong.float().mean())
        size = rounded.abs()
        ulp = (torch.nextafter(size, torch.full_like(size, float("inf"))) - size).float()
        # at most one unit off, or fp32 round-off of O(1) terms where they cancel to near zero
        assert ((got.double() - want).abs() <= ulp + 1e-6).all()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_state_keeps_the_streams_dtype(dtype):
    """The state a hyper-connection returns is in the dtype of the state it was given: the
    parameter dtype for a low-precision model, fp32 for an fp32 model under autocast."""
    hc = _live_hc()
    branch = torch.nn.Linear(64, 64)
    H = torch.randn(2, 3, 4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hc(H, branch).dtype == torch.float32
    hc_low, branch_low = copy.deepcopy(hc).to(dtype), copy.deepcopy(branch).to(dtype)
    H_low = H.to(dtype).requires_grad_(True)
    out = hc_low(H_low, branch_low)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert H_low.grad.dtype == dtype
    assert all(p.grad.dtype == dtype for p in hc_low.parameters())
    with torch.no_grad():
        assert hc_low(H_low, branch_low).dtype == dtype

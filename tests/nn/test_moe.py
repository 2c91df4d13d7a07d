"""The mixture-of-experts FFN: routed output and gradients equal a naive per-token loop over the
chosen experts (fp and BitNet, with and without padding rows), the auxiliary losses, the dispatch
plan (row order, bucketed row counts) and capacity dropping on hand-made routings, and dtypes
(bf16 parameters, bf16 autocast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperbit.nn.bitlinear import quantize_weight, ste_activation, ste_weight
from hyperbit.nn.moe import MoEFeedForward, balance_loss, capacity, quantize_expert_weight, route, z_loss
from hyperbit.nn.moe_dispatch import bucket_rows, dispatch_plan

D, H, E = 16, 24, 4

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def make(linear="fp", subln=False, top_k=2, capacity_factor=None, experts=E, seed=0, dtype=torch.float32,
         device="cpu"):
    torch.manual_seed(seed)
    moe = MoEFeedForward(D, H, experts, top_k, capacity_factor, linear, subln).to(device=device, dtype=dtype)
    with torch.no_grad():  # a router that routes decisively, and non-trivial SubLN gains
        moe.router.weight.normal_(0.0, 1.0)
        if subln:
            moe.ffn_sub_norm.weight.uniform_(0.5, 1.5)
    return moe


class FixedRouter(nn.Module):
    """Returns the given logits (N, E) whatever the input: a hand-made routing."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def naive(moe: MoEFeedForward, x: torch.Tensor, dropped: set | None = None) -> torch.Tensor:
    """The definition, token by token: softmax over the router logits, top-k, weights renormalised
    over the k (k = 1: the probability), each chosen expert written out as separate linears
    (BitLinear's functions on the expert's own weight slice for bitnet). ``dropped``: (token,
    choice) pairs that contribute nothing."""
    bitnet = moe.gate_proj.bitnet
    lin = (lambda v, w: F.linear(ste_activation(v), ste_weight(w))) if bitnet else F.linear
    xs = x.reshape(-1, D)
    wide = torch.promote_types(x.dtype, torch.float32)
    logits = moe.router(xs)
    outs = []
    for n in range(xs.shape[0]):
        probs = torch.softmax(logits[n].to(wide), -1)
        top = torch.topk(probs, moe.top_k)
        weights = top.values / top.values.sum() if moe.top_k > 1 else top.values
        y = torch.zeros(D, dtype=wide, device=x.device)
        for j, e in enumerate(top.indices.tolist()):
            if dropped and (n, j) in dropped:
                continue
            xn = xs[n:n + 1]
            hidden = F.silu(lin(xn, moe.gate_proj.weight[e])) * lin(xn, moe.up_proj.weight[e])
            if moe.ffn_sub_norm is not None:
                hf = hidden.to(wide)
                hidden = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + moe.ffn_sub_norm.eps)
                          * moe.ffn_sub_norm.weight[e].to(hf.dtype)).to(hidden.dtype)
            y = y + weights[j] * lin(hidden, moe.down_proj.weight[e])[0].to(wide)
        outs.append(y)
    return torch.stack(outs).to(x.dtype).reshape(x.shape)


def grads(moe, x, fn):
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape)).sum().backward()
    return out.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("linear,subln,top_k", [("fp", False, 2), ("fp", True, 3), ("fp", False, 1),
                                                 ("bitnet", True, 2), ("bitnet", False, 1)])
def test_routed_output_and_gradients_equal_a_per_token_loop(linear, subln, top_k, device):
    dtype = torch.float64 if linear == "fp" else torch.float32
    moe = make(linear, subln, top_k, dtype=dtype, device=device)
    x = torch.randn(2, 5, D, dtype=dtype, device=device)
    out, g = grads(moe, x, moe)
    ref, g_ref = grads(moe, x, lambda v: naive(moe, v))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    assert set(g) == set(g_ref) and "router.weight" in g and "x" in g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=name)
    assert g["router.weight"].abs().sum() > 0 if top_k > 1 else True  # the router learns from the loss
    # every expert was used by some token, so every expert weight got a gradient somewhere
    chosen = route(moe.router(x.reshape(-1, D)), top_k)[2]
    assert moe.aux["assignments"] == 10 * top_k and int(moe.aux["dropped"]) == 0
    for e in chosen.unique().tolist():
        assert g["down_proj.weight"][e].abs().sum() > 0


def test_top1_weight_is_the_probability():
    moe = make(top_k=1)
    logits = moe.router(torch.randn(7, D))
    probs, weights, chosen = route(logits, 1)
    torch.testing.assert_close(weights[:, 0], probs.max(-1).values, rtol=0, atol=0)
    probs, weights, chosen = route(logits, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))
    assert (weights[:, :-1] >= weights[:, 1:]).all()  # highest probability first


def test_expert_weight_quantisation_is_bitlinears_per_expert():
    torch.manual_seed(0)
    w = torch.randn(5, 7, 9) * torch.tensor([0.01, 0.1, 1.0, 3.0, 1e-7]).view(5, 1, 1)
    codes, gamma = quantize_expert_weight(w)
    assert gamma.shape == (5, 1, 1)
    for e in range(5):
        c, g = quantize_weight(w[e])
        assert torch.equal(codes[e], c) and torch.equal(gamma[e, 0, 0], g)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    n = 64
    uniform_probs = torch.full((n, E), 1 / E)
    uniform_load = torch.full((E,), n * 2 // E)
    assert balance_loss(uniform_probs, uniform_load).item() == pytest.approx(1.0, abs=1e-7)
    # a perfectly balanced load gives 1 whatever the probabilities (and vice versa)
    probs = torch.softmax(torch.randn(n, E), -1)
    assert balance_loss(probs, uniform_load).item() == pytest.approx(1.0, abs=1e-6)
    # skewed: routing (load and probabilities) leaning to expert 0 more and more
    values = []
    for skew in (0.0, 1.0, 2.0, 4.0, 8.0):
        logits = torch.zeros(n, E)
        logits[:, 0] = skew
        logits += 0.01 * torch.arange(n * E).reshape(n, E).remainder(E)  # break ties deterministically
        probs, _, chosen = route(logits, 1)
        load = dispatch_plan(chosen, E).load
        values.append(balance_loss(probs, load).item())
    assert values[0] < values[1] < values[2] < values[3] < values[4] <= E
    assert values[4] == pytest.approx(E * torch.softmax(torch.tensor([8.0, 0.01, 0.02, 0.03]), 0)[0].item(), rel=1e-3)
    # the module: a zero router routes uniformly (P_i = 1/E), so its balance loss is exactly 1
    moe = make()
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(3, 8, D))
    assert moe.aux["balance"].item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_gradient_pushes_towards_uniform():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 8, requires_grad=True)
    probs, _, chosen = route(logits, 1)
    balance_loss(probs, dispatch_plan(chosen, E).load).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()  # descent lowers expert 0


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, -1.0, 0.5]])
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 2
    assert z_loss(logits).item() == pytest.approx(want, rel=1e-6)
    moe = make()
    x = torch.randn(2, 3, D)
    moe(x)
    assert moe.aux["z"].item() == pytest.approx(z_loss(moe.router(x.reshape(-1, D))).item(), rel=1e-6)


# A hand-made routing of N = 6 tokens to E = 3 experts, k = 2 (first choice, second choice):
HAND = [(0, 1), (0, 2), (0, 1), (1, 0), (0, 2), (2, 0)]


def hand_logits():
    logits = torch.full((len(HAND), 3), -4.0)
    for n, (a, b) in enumerate(HAND):
        logits[n, a], logits[n, b] = 2.0, 1.0 - 0.1 * n  # distinct weights per token
    return logits


def test_rows_follow_the_priority_order():
    plan = dispatch_plan(torch.tensor(HAND), 3)
    assert plan.load.tolist() == [6, 3, 3] and plan.sizes == [6, 3, 3] and int(plan.dropped) == 0
    # assignments choice-major: a = j * 6 + n. Expert 0 (rows 0-5): first choices of tokens
    # 0, 1, 2, 4, then second choices of 3, 5; expert 1 (rows 6-8): token 3's first choice, second
    # choices of 0, 2; expert 2 (rows 9-11): token 5's first choice, second choices of 1, 4
    assert plan.row_assignment.tolist() == [0, 1, 2, 4, 9, 11, 3, 6, 8, 5, 7, 10]
    assert plan.row.tolist() == [0, 1, 2, 6, 3, 9,    # first choices: experts 0 0 0 1 0 2
                                 7, 10, 8, 4, 11, 5]  # second choices: experts 1 2 1 0 2 0
    # capacity 2: every expert keeps its first two; the dropped ones get row M = 6
    plan = dispatch_plan(torch.tensor(HAND), 3, 2)
    assert plan.sizes == [2, 2, 2] and int(plan.dropped) == 6
    assert plan.row_assignment.tolist() == [0, 1, 3, 6, 5, 7]
    assert plan.row.tolist() == [0, 1, 6, 2, 6, 4, 3, 5, 6, 6, 6, 6]


def test_row_counts_are_bucketed_and_padding_rows_hold_no_assignment():
    assert [bucket_rows(r) for r in (0, 1, 15, 16, 17, 31, 32, 33, 513, 576, 577, 1000)] == \
        [0, 1, 15, 16, 18, 32, 32, 36, 576, 576, 640, 1024]
    for r in range(1, 5000):
        assert r <= bucket_rows(r) <= r * 9 / 8
    assert {bucket_rows(r) for r in range(513, 1025)} == set(range(576, 1025, 64))  # 8 per octave
    # 17 tokens, all to expert 0 (top-1 of 2): 18 rows, the last a padding row (assignment k*N)
    plan = dispatch_plan(torch.zeros(17, 1, dtype=torch.long), 2)
    assert plan.sizes == [18, 0] and plan.row_assignment.tolist() == list(range(17)) + [17]
    assert plan.row.tolist() == list(range(17))


def test_padded_rows_output_and_gradients_equal_a_per_token_loop():
    """A batch whose expert loads are not bucket sizes: padding rows (copies of token 0, weight 0)
    must add nothing to the output or any gradient, with and without capacity drops."""
    x = torch.randn(3, 40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for linear, subln, factor in [("fp", False, None), ("fp", True, 0.9), ("bitnet", True, None)]:
        moe = make(linear, subln, experts=4, capacity_factor=factor, dtype=torch.float64)
        chosen = route(moe.router(x.reshape(-1, D)), 2)[2]
        plan = dispatch_plan(chosen, 4, capacity(120, 2, 4, factor))
        assert sum(plan.sizes) > 240 - int(plan.dropped)  # the batch has padding rows
        out, g = grads(moe, x, moe)
        dropped = set()
        if factor is not None:  # the (token, choice) pairs the plan drops
            lost = (plan.row == sum(plan.sizes)).nonzero().flatten().tolist()  # assignments j * 120 + n
            dropped = {(a % 120, a // 120) for a in lost}
            assert len(dropped) == int(plan.dropped) == int(moe.aux["dropped"]) > 0
        ref, g_ref = grads(moe, x, lambda v: naive(moe, v, dropped))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for name in g:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=f"{linear} {name}")


@pytest.mark.parametrize("factor,cap,dropped", [
    # ceil(0.5 * 6 * 2 / 3) = 2 per expert: expert 0 keeps the first choices of tokens 0, 1 only,
    # experts 1 and 2 their first choice and one second choice; tokens 2 and 4 lose both choices
    (0.5, 2, {(2, 0), (4, 0), (3, 1), (5, 1), (2, 1), (4, 1)}),
    (0.75, 3, {(4, 0), (3, 1), (5, 1)}),  # ceil(3) = 3: expert 0 keeps first choices of 0, 1, 2
    (1.0, 4, {(3, 1), (5, 1)}),  # 4: expert 0 keeps all 4 first choices, drops both second ones
    (1.5, 6, set()), (None, None, set())])
def test_capacity_drops_exactly_the_lowest_priority_assignments(factor, cap, dropped):
    assert capacity(6, 2, 3, factor) == cap
    moe = make(experts=3, capacity_factor=factor)
    logits = hand_logits()
    moe.router = FixedRouter(logits)
    assert route(logits, 2)[2].tolist() == [list(p) for p in HAND]
    x = torch.randn(6, D, dtype=torch.float32)
    out, g = grads(moe, x, moe)
    assert int(moe.aux["dropped"]) == len(dropped) and moe.aux["assignments"] == 12
    ref, g_ref = grads(moe, x, lambda v: naive(moe, v, dropped))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # a token whose both choices were dropped gets exactly zero
    both = {n for n in range(6) if (n, 0) in dropped and (n, 1) in dropped}
    assert both == ({2, 4} if cap == 2 else set())
    for n in both:
        assert torch.equal(out[n], torch.zeros(D))


def test_capacity_counts_every_dropped_assignment_in_a_big_batch():
    moe = make(experts=4, capacity_factor=1.0)
    x = torch.randn(3, 40, D)
    moe(x)
    chosen = route(moe.router(x.reshape(-1, D)), 2)[2]
    load = torch.bincount(chosen.reshape(-1), minlength=4)
    cap = math.ceil(1.0 * 120 * 2 / 4)
    assert int(moe.aux["dropped"]) == int((load - cap).clamp(min=0).sum()) > 0
    # a factor large enough to drop nothing gives exactly the dropless output
    big = make(experts=4, capacity_factor=4.0)
    free = make(experts=4, capacity_factor=None)
    assert torch.equal(big(x), free(x)) and int(big.aux["dropped"]) == 0


@pytest.mark.parametrize("linear,factor", [("fp", 0.9), ("fp", 1.5), ("bitnet", 0.6)])
def test_a_static_capacity_plan_reads_no_row_count_and_gives_the_same_result(linear, factor, monkeypatch):
    """With a capacity, ``static_capacity`` plans cap rows per expert (the default off the CPU):
    no value is read back from the device to plan the rows, and the output, every gradient and
    the dropped count equal the bucketed plan's (padding rows hold no assignment)."""
    x = torch.randn(3, 40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    moe = make(linear, experts=4, capacity_factor=factor, dtype=torch.float64)
    assert moe.static_capacity is None  # on the CPU: the row counts are read and bucketed
    out, g = grads(moe, x, moe)
    dropped = int(moe.aux["dropped"])

    def host_read(*_):
        raise AssertionError("the static plan read a value back from the device")

    moe.static_capacity = True
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", host_read)
        m.setattr(torch.Tensor, "item", host_read)
        out_s, g_s = grads(moe, x, moe)
    assert int(moe.aux["dropped"]) == dropped
    torch.testing.assert_close(out_s, out, rtol=1e-12, atol=1e-12)
    for name in g:
        torch.testing.assert_close(g_s[name], g[name], rtol=1e-12, atol=1e-12, msg=name)
    chosen = route(moe.router(x.reshape(-1, D)), 2)[2]
    cap = capacity(120, 2, 4, factor)
    assert dispatch_plan(chosen, 4, cap, static=True).sizes == [cap] * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("linear", ["fp", "bitnet"])
def test_bf16_params_and_bf16_autocast(linear, device):
    moe = make(linear, subln=linear == "bitnet", device=device)
    x = torch.randn(2, 6, D, device=device)
    ref = moe(x)
    # bf16 autocast: experts compute in bf16, the router stays fp32
    with torch.autocast(device, dtype=torch.bfloat16):
        out = moe(x.requires_grad_(True))
        assert moe.router(x).dtype == torch.float32
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in moe.parameters())
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    # bf16 parameters, fp16 parameters
    for dtype in (torch.bfloat16, torch.float16):
        low = make(linear, subln=linear == "bitnet", dtype=dtype, device=device)
        xl = x.detach().to(dtype).requires_grad_(True)
        y = low(xl)
        assert y.dtype == dtype and moe.aux["z"].dtype == torch.float32
        y.float().sum().backward()
        assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in low.parameters())
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_invalid_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="moe_top_k=5 must be between 1 and moe_experts=4"):
        MoEFeedForward(D, H, 4, 5)
    with pytest.raises(ValueError, match="moe_capacity_factor must be > 0"):
        MoEFeedForward(D, H, 4, 2, 0.0)
    with pytest.raises(ValueError, match="linear='int4' is not allowed"):
        MoEFeedForward(D, H, 4, 2, linear="int4")

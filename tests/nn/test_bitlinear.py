"""BitLinear b1.58 (spec ``bitnet.md`` section 1): ternary absmean weights, 8-bit per-token absmax
activations, straight-through gradients, conversion helpers, lambda warm-up, and a tiny LM that
actually learns with quantisation live."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyperbit
from hyperbit.data import load_pystdlib
from hyperbit.nn.bitlinear import (
    EPS,
    BitLinear,
    convert_to_bitlinear,
    quantize_activation,
    quantize_weight,
)

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _reference_quant(x: torch.Tensor, w: torch.Tensor):
    """Spec formulas written out independently of the module: (x_q, W_q) effective fp32 tensors."""
    xf, wf = x.detach().float(), w.detach().float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    xq = (xf * s).round().clamp(-128, 127) / s
    gamma = torch.clamp(wf.abs().mean(), min=EPS)  # the clamp form: one gamma both ways
    wq = (wf / gamma).round().clamp(-1, 1) * gamma
    return xq, wq


# --------------------------------------------------------------------------------------------
# 1. weights: {-gamma, 0, +gamma}, gamma = mean|W|, zero band |w| < gamma/2
# --------------------------------------------------------------------------------------------

def test_weights_are_ternary_absmean_with_half_gamma_zero_band():
    # Probes around gamma/2 and gamma, plus a filler that pins mean|W| to 1.0 exactly.
    probes = torch.tensor([0.0, 0.10, 0.45, 0.49, 0.51, 0.55, 0.90, 0.99, 1.01, 1.10, 2.0, 3.5])
    expected_codes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float32)
    n = 64
    filler = (n - 2 * probes.sum().item()) / (n - 2 * probes.numel())  # sum|W| = n -> gamma = 1
    flat = torch.full((n,), filler)
    flat[: probes.numel()] = probes
    flat[probes.numel(): 2 * probes.numel()] = -probes
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    w = flat[perm].reshape(8, 8).contiguous()

    for scale in (1.0, 0.037, 250.0):  # codes are scale invariant, gamma scales with W
        ws = w * scale
        codes, gamma = quantize_weight(ws)
        assert gamma.dtype == torch.float32 and gamma.ndim == 0
        assert gamma.item() == pytest.approx(ws.double().abs().mean().item(), rel=1e-6)
        assert gamma.item() == pytest.approx(scale, rel=1e-5)
        flat_codes = codes.flatten()[torch.argsort(perm)]
        assert torch.equal(flat_codes[: probes.numel()], expected_codes)  # +probes
        assert torch.equal(flat_codes[probes.numel(): 2 * probes.numel()], -expected_codes)
        assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0}
        eff = codes * gamma
        assert set(eff.unique().tolist()) == {-gamma.item(), 0.0, gamma.item()}

    # The module's effective weight, read through its forward: a one-hot input row of 1.0 survives
    # 8-bit quantisation exactly (code 127, s = 127), so bl(I) = W_q^T exactly.
    torch.manual_seed(0)
    bl = BitLinear(8, 8)
    with torch.no_grad():
        bl.weight.copy_(w * 0.3)
    gamma = (w * 0.3).abs().mean()
    with torch.no_grad():
        eff_t = bl(torch.eye(8))
    eff_w = eff_t.T
    assert set(eff_w.unique().tolist()) == {-gamma.item(), 0.0, gamma.item()}
    codes, _ = quantize_weight(w * 0.3)
    torch.testing.assert_close(eff_w, codes * gamma, rtol=0, atol=0)
    # |w| in (gamma/2, gamma) becomes +-gamma, |w| < gamma/2 becomes 0
    wv = bl.weight.detach()
    mid = (wv.abs() > 0.5 * gamma * 1.02) & (wv.abs() < gamma)
    low = wv.abs() < 0.5 * gamma * 0.98
    assert mid.sum() >= 4 and low.sum() >= 4
    assert torch.equal(eff_w[mid], torch.sign(wv[mid]) * gamma)
    assert torch.all(eff_w[low] == 0)


def test_weight_scale_is_clamped_and_the_same_both_ways():
    """gamma = max(mean|W|, eps) divides and multiplies: W_q / gamma is exactly ternary, the zero
    band is exactly |w| < gamma/2 at every scale, and tiny or all-zero weights stay finite."""
    # Probes a hair either side of gamma/2 at gamma = 1e-3, where W / (gamma + eps) would shift
    # the band by 1%: 0.501 gamma rounds to 1 here, 0.501 / 1.01 = 0.496 would round to 0.
    n = 32
    w = torch.full((n,), 1e-3)
    w[:4] = torch.tensor([0.501e-3, -0.501e-3, 0.499e-3, -0.499e-3])
    w[4:8] = torch.tensor([1.499e-3, 1.501e-3, 1.501e-3, 1.499e-3])  # keeps mean|W| at 1e-3
    w = w.reshape(4, 8)
    codes, gamma = quantize_weight(w)
    assert gamma.item() == pytest.approx(1e-3, rel=1e-6)
    assert codes.flatten()[:4].tolist() == [1.0, -1.0, 0.0, 0.0]
    torch.testing.assert_close(codes, (w / gamma).round().clamp(-1, 1), rtol=0, atol=0)

    # W_q / gamma is exactly ternary, through the module's forward (bl(I) = W_q^T exactly)
    for scale in (1e-4, 1e-2, 3.0):
        torch.manual_seed(1)
        bl = BitLinear(16, 16)
        with torch.no_grad():
            bl.weight.copy_(torch.randn(16, 16) * scale)
            eff = bl(torch.eye(16)).T
        c, g = quantize_weight(bl.weight)
        assert g.item() == pytest.approx(bl.weight.detach().double().abs().mean().item(), rel=1e-6)
        ratio = eff / g
        assert set(ratio.unique().tolist()) == {-1.0, 0.0, 1.0}
        assert torch.equal(ratio, c)

    # all-zero weight: gamma = eps, codes 0, output 0, gradients finite (no 0/0)
    bl = BitLinear(8, 4)
    with torch.no_grad():
        bl.weight.zero_()
    codes, gamma = quantize_weight(bl.weight)
    assert gamma.item() == torch.tensor(EPS).item() and torch.equal(codes, torch.zeros(4, 8))
    x = torch.randn(3, 8, requires_grad=True)
    y = bl(x)
    assert torch.equal(y, torch.zeros(3, 4))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(bl.weight.grad).all()
    assert torch.equal(x.grad, torch.zeros(3, 8))  # grad_x = g @ W_q = 0

    # tiny weight (mean|W| ~ 2e-7 < eps): quantised on the eps grid, dequantised with the same eps
    w = torch.full((64,), 1e-8)
    w[0], w[1], w[2] = 6e-6, -7e-6, 4e-6
    w = w.reshape(8, 8)
    assert w.abs().mean().item() < EPS / 10
    codes, gamma = quantize_weight(w)
    assert gamma.item() == torch.tensor(EPS).item()
    assert codes.flatten()[:3].tolist() == [1.0, -1.0, 0.0] and codes.flatten()[3:].abs().sum() == 0
    bl = BitLinear(8, 8)
    with torch.no_grad():
        bl.weight.copy_(w)
        eff = bl(torch.eye(8)).T
    expected = torch.zeros(64)
    expected[0], expected[1] = EPS, -EPS
    torch.testing.assert_close(eff.flatten(), expected.float(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 2. activations: 8-bit absmax, one scale per token
# --------------------------------------------------------------------------------------------

def test_activations_are_8bit_absmax_per_token():
    torch.manual_seed(0)
    d = 64
    x = torch.randn(3, 5, d) * torch.logspace(-3, 3, 5).view(1, 5, 1)  # magnitudes 1e-3 .. 1e3
    codes, s = quantize_activation(x)
    assert s.shape == (3, 5, 1) and s.dtype == torch.float32 and codes.dtype == torch.float32
    amax = x.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(s, 127.0 / amax, rtol=1e-6, atol=0)
    assert torch.equal(codes, codes.round()) and codes.min() >= -128 and codes.max() <= 127
    # rounding, not truncation: |x_q - x| <= 0.5 / s per token
    err = (codes / s - x).abs()
    assert torch.all(err <= 0.5 / s * (1 + 1e-5))
    assert (err > 0.25 / s).any()  # the error really is quantisation error of that size

    rows_x, rows_c = x.reshape(-1, d), codes.reshape(-1, d)
    for xr, cr in zip(rows_x, rows_c):
        assert cr.unique().numel() <= 256
        i = xr.abs().argmax()
        assert cr[i].item() == 127.0 * torch.sign(xr[i]).item()  # max-abs element -> +-127 / s
        assert cr.abs().max().item() == 127.0  # every token uses its full range

    # Two tokens, magnitudes 1e4 and 1e-4 apart in one tensor: each uses its own full range.
    ramp = torch.linspace(-1.0, 1.0, d)
    pair = torch.stack([ramp * 1e3, ramp.flip(0) * 1e-3])
    pc, ps = quantize_activation(pair)
    assert ps[0].item() == pytest.approx(0.127, rel=1e-6)
    assert ps[1].item() == pytest.approx(127e3, rel=1e-6)
    for row in range(2):
        assert pc[row].abs().max().item() == 127.0
        assert pc[row].unique().numel() == d  # ramp step 2/63*127 ~ 4 codes: all distinct
        torch.testing.assert_close(pc[row] / ps[row], pair[row], rtol=0,
                                   atol=pair[row].abs().max().item() / 254 * 1.0001)

    # The same through the module: with W = I (gamma = 1/64, codes = I) bl(x) = x_q / 64.
    bl = BitLinear(d, d)
    with torch.no_grad():
        bl.weight.copy_(torch.eye(d))
        y = bl(pair)
    xq_eff = y * d
    torch.testing.assert_close(xq_eff, pc / ps, rtol=1e-6, atol=0)
    for row in range(2):
        lv = xq_eff[row]
        assert lv.unique().numel() == d
        assert lv.abs().max().item() == pytest.approx(pair[row].abs().max().item(), rel=1e-6)
        assert torch.allclose(lv * ps[row], (lv * ps[row]).round(), atol=1e-3)  # on the 8-bit grid

    # zero token: no NaN, all codes 0
    zc, zs = quantize_activation(torch.zeros(2, d))
    assert torch.equal(zc, torch.zeros(2, d)) and torch.isfinite(zs).all()


# --------------------------------------------------------------------------------------------
# 3. straight-through estimator, forward equality, fp32 scales under autocast
# --------------------------------------------------------------------------------------------

def test_ste_gradients_equal_linear_at_quantised_tensors():
    torch.manual_seed(0)
    bl = BitLinear(32, 16)
    x = torch.randn(4, 5, 32, requires_grad=True)
    y = bl(x)
    g = torch.randn_like(y)
    y.backward(g)

    xc, s = quantize_activation(x)
    wc, gamma = quantize_weight(bl.weight)
    xq = (xc / s).requires_grad_(True)
    wq = (wc * gamma).requires_grad_(True)
    ref_x, ref_w = _reference_quant(x, bl.weight)
    torch.testing.assert_close(xq.detach(), ref_x, rtol=0, atol=0)
    torch.testing.assert_close(wq.detach(), ref_w, rtol=0, atol=0)

    y_ref = F.linear(xq, wq)
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-6, atol=1e-6)
    y_ref.backward(g)

    assert x.grad is not None and bl.weight.grad is not None
    torch.testing.assert_close(x.grad, xq.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bl.weight.grad, wq.grad, rtol=1e-6, atol=1e-6)
    # and written out: grad_x = g @ W_q, grad_W = g^T @ x_q
    torch.testing.assert_close(x.grad, g @ wq.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bl.weight.grad, g.reshape(-1, 16).T @ xq.detach().reshape(-1, 32),
                               rtol=1e-5, atol=1e-5)
    # the STE really passes through quantisation: not the gradient at the latent (fp) tensors
    assert not torch.allclose(x.grad, g @ bl.weight.detach(), rtol=1e-2, atol=1e-4)
    # latent weights stay full precision (not ternary)
    assert bl.weight.detach().unique().numel() > 3


def test_scale_math_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    bl = BitLinear(64, 32)
    x32 = torch.randn(6, 64) * torch.logspace(-2, 2, 6).view(6, 1)
    x16 = x32.to(torch.bfloat16)  # what a bf16-autocast model feeds the next projection
    ref_xc, ref_s = quantize_activation(x16.float())
    ref_wc, ref_g = quantize_weight(bl.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xc, s = quantize_activation(x16)
        wc, g = quantize_weight(bl.weight)
        wc16, g16 = quantize_weight(bl.weight.detach().to(torch.bfloat16))
        y = bl(x16)
    assert s.dtype == torch.float32 and g.dtype == torch.float32 and g16.dtype == torch.float32
    assert torch.equal(xc, ref_xc) and torch.equal(s, ref_s)
    assert torch.equal(wc, ref_wc) and torch.equal(g, ref_g)
    w16f = bl.weight.detach().to(torch.bfloat16).float()
    assert g16.item() == pytest.approx(w16f.abs().mean().item(), rel=1e-6)
    assert torch.equal(wc16, (w16f / g16).round().clamp(-1, 1))
    # the output is the quantised product, up to bf16 matmul rounding
    y_ref = F.linear(ref_xc / ref_s, ref_wc * ref_g)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2 * y_ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# 4. conversion helpers and the linear="bitnet" model
# --------------------------------------------------------------------------------------------

def test_from_linear_shares_weight_storage():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    bl = BitLinear.from_linear(lin)
    assert isinstance(bl, BitLinear) and bl.bias is None and bl.quant_strength == 1.0
    assert (bl.in_features, bl.out_features) == (16, 8)
    assert bl.weight is lin.weight
    assert bl.weight.data_ptr() == lin.weight.data_ptr()
    with torch.no_grad():
        lin.weight[0, 0] = 123.0
    assert bl.weight[0, 0].item() == 123.0
    with pytest.raises(ValueError):
        BitLinear.from_linear(nn.Linear(4, 4, bias=True))
    with pytest.raises(ValueError):
        BitLinear(4, 4, bias=True)


def test_convert_to_bitlinear_on_tiny_model():
    torch.manual_seed(0)
    model = hyperbit.build_model(hyperbit.preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    n_params = model.num_params()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits_fp, _ = model(idx)

    assert convert_to_bitlinear(model) is model
    converted = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    expected = {f"blocks.{i}.{part}.{p}" for i in range(2)
                for part, names in (("attn", PROJ_NAMES[:4]), ("ffn", PROJ_NAMES[4:]))
                for p in names}
    assert converted == expected and len(converted) == 14
    assert type(model.head) is nn.Linear
    assert type(model.embed) is nn.Embedding
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # no copies
    assert model.num_params() == n_params
    with torch.no_grad():
        logits_q, _ = model(idx)
    assert not torch.allclose(logits_q, logits_fp, atol=1e-5)  # quantisation is live

    # custom filter_fn: called with qualified names, decision honoured
    model2 = hyperbit.build_model(hyperbit.preset("tiny"))
    seen = []

    def only_attn(name, module):
        seen.append(name)
        return ".attn." in name

    convert_to_bitlinear(model2, only_attn)
    assert "head" in seen and "blocks.0.ffn.down_proj" in seen and "blocks.1.attn.q_proj" in seen
    conv2 = {n for n, m in model2.named_modules() if isinstance(m, BitLinear)}
    assert conv2 == {n for n in expected if ".attn." in n} and len(conv2) == 8
    assert all(type(model2.get_submodule(n)) is nn.Linear for n in expected - conv2)

    # a filter that accepts everything converts the head too (the default is what skips it)
    model3 = convert_to_bitlinear(hyperbit.build_model(hyperbit.preset("tiny")), lambda n, m: True)
    assert isinstance(model3.head, BitLinear)


def test_bitnet_model_has_live_quantisation():
    torch.manual_seed(0)
    qmodel = hyperbit.build_model(hyperbit.preset("tiny", linear="bitnet"))
    for i in range(2):
        for part, names in (("attn", PROJ_NAMES[:4]), ("ffn", PROJ_NAMES[4:])):
            for p in names:
                assert isinstance(qmodel.get_submodule(f"blocks.{i}.{part}.{p}"), BitLinear)
    assert type(qmodel.head) is nn.Linear and type(qmodel.embed) is nn.Embedding
    # the fp twin with the same layout (SubLN on) and the very same weights
    fmodel = hyperbit.build_model(hyperbit.preset("tiny", linear="fp", subln=True))
    fmodel.load_state_dict(qmodel.state_dict())
    assert not any(isinstance(m, BitLinear) for m in fmodel.modules())
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        lq, _ = qmodel(idx)
        lf, _ = fmodel(idx)
        assert (lq - lf).abs().max() > 1e-3
        for m in qmodel.modules():  # lambda = 0 everywhere: exactly the fp model
            if isinstance(m, BitLinear):
                m.quant_strength = 0.0
        l0, _ = qmodel(idx)
    torch.testing.assert_close(l0, lf, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 5. quant_strength (lambda warm-up)
# --------------------------------------------------------------------------------------------

def test_quant_strength_blends_between_fp_and_quantised():
    torch.manual_seed(0)
    bl = BitLinear(32, 16)
    x = torch.randn(3, 7, 32)
    w = bl.weight.detach()
    xq, wq = _reference_quant(x, w)

    bl.quant_strength = 0.0
    with torch.no_grad():
        y0 = bl(x)
    assert torch.equal(y0, F.linear(x, w))

    bl.quant_strength = 1.0
    with torch.no_grad():
        y1 = bl(x)
    torch.testing.assert_close(y1, F.linear(xq, wq), rtol=1e-6, atol=1e-6)
    assert (y1 - y0).abs().max() > 1e-2  # the two ends really differ

    lam = 0.25
    bl.quant_strength = lam
    xi = x.clone().requires_grad_(True)
    yh = bl(xi)
    xb, wb = x + lam * (xq - x), w + lam * (wq - w)
    torch.testing.assert_close(yh.detach(), F.linear(xb, wb), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(yh)
    yh.backward(g)  # STE: gradients of a plain linear at the blended tensors
    torch.testing.assert_close(xi.grad, g @ wb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bl.weight.grad, g.reshape(-1, 16).T @ xb.reshape(-1, 32),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 6. a tiny BitNet LM learns real text
# --------------------------------------------------------------------------------------------

def _train_tiny_bitnet(steps: int = 80, lr: float = 3e-3, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    data = load_pystdlib("train", max_bytes=200_000).long()
    assert data.numel() == 200_000
    model = hyperbit.build_model(hyperbit.preset("tiny", linear="bitnet"))
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 14
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    B, T, losses = 8, 64, []
    for _ in range(steps):
        ix = torch.randint(0, data.numel() - T - 1, (B,), generator=gen)
        xb = torch.stack([data[i:i + T] for i in ix])
        yb = torch.stack([data[i + 1:i + T + 1] for i in ix])
        _, loss = model(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_bitnet_lm_loss_goes_down_on_pystdlib():
    losses = _train_tiny_bitnet(steps=80)
    assert all(math.isfinite(v) for v in losses)
    first = sum(losses[:3]) / 3
    last = sum(losses[-10:]) / 10
    assert abs(first - math.log(256)) < 0.4  # starts near uniform over bytes (ln 256 = 5.55)
    # measured (seed 0): first ~5.36, last-10 mean ~2.88; seeds 0-4 give 2.76-3.14.
    # The unigram entropy of this text is 3.12 nats, so < 3.4 also means "learnt the byte stats".
    assert last < first - 1.5, (first, last)
    assert last < 3.4, last


@pytest.mark.slow
def test_tiny_bitnet_lm_needs_the_rescale():
    """400 steps separate a correct BitLinear from one that drops the dequantisation rescale
    (spec: "dropping it is a known failure"). Measured last-20 mean loss at 400 steps:
    correct 2.24 (seeds 1, 2: 2.36, 2.34); without ``* gamma`` 2.66, without ``/ s`` 2.54,
    without both 2.69 -- they plateau near the bigram level while the correct run keeps going."""
    losses = _train_tiny_bitnet(steps=400)
    last = sum(losses[-20:]) / 20
    assert last < 2.45, last

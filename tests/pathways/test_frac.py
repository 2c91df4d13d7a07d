"""Frac-connections (spec section 7, section 8 checks): exact Pre-Norm at init, the connection
against the formulas written out here as loops over fractions, the memory-lean nodes against
plain autograd, live mixing, dtypes and shapes.

The reference here is written independently of ``hyperbit.pathways``, so a transposed or dropped
mixing in the library cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hyperbit as hb
from hyperbit.pathways import FracConnection, make_pathway

torch.set_default_dtype(torch.float32)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def tiny(**kw) -> hb.ModelConfig:
    base = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return hb.ModelConfig(**{**base, **kw})


def batch(cfg, B=2, T=12, seed=0, device="cpu"):
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    return idx.to(device), idx.roll(-1, 1).to(device)


def randomise(model, seed=1, matrices=True):
    """Random non-trivial shared weights (norm gains included); connection weights untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "static_" in name or "dynamic_" in name or (p.ndim > 1 and not matrices):
                continue
            base, scale = (1.0, 0.3) if p.ndim == 1 else (0.0, 0.15)
            p.copy_(base + scale * torch.randn(p.shape, generator=g).to(p.device))


def live(fc: FracConnection, seed=0, scale=0.3) -> FracConnection:
    """Non-identity static weights, non-zero dynamic weights and gains, a random norm gain."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fc.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return fc


# ---------------------------------------------------------------------------------------------
# spec 8.1 / 8.2: at init the frac LM is the Pre-Norm LM (forward and gradients), any m
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 2, 4, 32])  # 32 = d: fractions of one feature
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("linear", ["fp", "bitnet"])
@pytest.mark.parametrize("weights", ["init", "random"])
def test_frac_at_init_equals_prenorm(weights, linear, dynamic, m, device):
    torch.manual_seed(0)
    ref = hb.build_model(tiny(linear=linear)).to(device)
    randomise(ref, matrices=weights == "random")
    model = hb.build_model(tiny(linear=linear, pathway="frac", frac_rate=m, hc_dynamic=dynamic)).to(device)
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all("static_" in k or "dynamic_" in k for k in missing)
    idx, tgt = batch(ref.cfg, device=device)
    logits_ref, loss_ref = ref(idx, tgt)
    logits, loss = model(idx, tgt)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-5)
    loss_ref.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    shared = [(k, p.grad, ref_params[k].grad) for k, p in model.named_parameters() if k in ref_params]
    assert len(shared) == len(ref_params)
    for name, g, g_ref in shared:
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_static_frac_m1_is_exactly_prenorm():
    torch.manual_seed(0)
    ref = hb.build_model(tiny())
    randomise(ref)
    model = hb.build_model(tiny(pathway="frac", frac_rate=1, hc_dynamic=False))
    model.load_state_dict(ref.state_dict(), strict=False)
    idx, tgt = batch(ref.cfg)
    logits_ref, loss_ref = ref(idx, tgt)
    logits, loss = model(idx, tgt)
    assert torch.equal(logits, logits_ref)  # multiplying by 1.0 and adding 0.0 is exact
    loss_ref.backward()
    loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name in ref_params:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-6, atol=1e-8, msg=name)


# ---------------------------------------------------------------------------------------------
# the connection against the formulas, with random non-symmetric weights
# ---------------------------------------------------------------------------------------------
def spec_rmsnorm(x, weight, eps):
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def reference_frac(F, A_m, A_r, B, branch):
    """Section 7 / the module docstring as loops. F: (B, T, m, c); A_m, A_r: (..., m, m);
    B: (..., m); branch maps the concatenated input (B, T, d) to (B, T, d)."""
    m, c = F.shape[-2], F.shape[-1]
    x = torch.cat([sum(A_m[..., j, i, None] * F[..., j, :] for j in range(m)) for i in range(m)], -1)
    y = branch(x)
    out = []
    for i in range(m):
        mixed_i = sum(A_r[..., j, i, None] * F[..., j, :] for j in range(m))  # (A_r^T F)_i
        out.append(mixed_i + B[..., i, None] * y[..., i * c:(i + 1) * c])  # H'_i + B_i y_i
    return torch.stack(out, dim=-2)


def reference_weights(fc: FracConnection, F):
    """A_m, A_r, B (per token for dynamic ones): s * tanh(norm(F_j) W) + static, row j from F_j."""
    m = fc.frac_rate
    alpha, beta = fc.static_alpha, fc.static_beta
    if fc.dynamic:
        Fn = spec_rmsnorm(F, None, fc.stream_norm.eps)  # per fraction
        a = torch.einsum("btjc,ck->btjk", Fn, fc.dynamic_alpha_fn)
        b = torch.einsum("btjc,c->btj", Fn, fc.dynamic_beta_fn)
        if fc.use_tanh:
            a, b = a.tanh(), b.tanh()
        alpha, beta = fc.dynamic_alpha_scale * a + alpha, fc.dynamic_beta_scale * b + beta
    return alpha[..., :m], alpha[..., m:], beta


@pytest.mark.parametrize("grad", [True, False], ids=["fused", "no_grad"])
@pytest.mark.parametrize("dynamic,use_tanh", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_frac_connection_matches_the_formulas(m, dynamic, use_tanh, grad):
    """Values and gradients (of F and every parameter) of forward, and of the two halves."""
    torch.manual_seed(0)
    d = 24
    fc = live(FracConnection(d, m, branch_index=2, dynamic=dynamic, use_tanh=use_tanh))
    F = torch.randn(2, 5, m, d // m, requires_grad=True)
    branch = torch.nn.Linear(d, d)
    probe = torch.randn(2, 5, m, d // m)  # a loss weighing every output element differently
    A_m, A_r, B = reference_weights(fc, F)
    out_ref = reference_frac(F, A_m, A_r, B, lambda x: branch(spec_rmsnorm(x, fc.norm.weight, fc.norm.eps)))
    params = [F] + list(fc.parameters())
    grads_ref = torch.autograd.grad((out_ref * probe).sum(), params)
    with torch.set_grad_enabled(grad):
        out = fc(F, branch)
        x, ctx = fc.width_connection(F)
        out2 = fc.depth_connection(ctx, branch(x))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2, out_ref, rtol=1e-5, atol=1e-5)
    A_m_x = torch.cat([sum(A_m[..., j, i, None] * F[..., j, :] for j in range(m)) for i in range(m)], -1)
    torch.testing.assert_close(x, spec_rmsnorm(A_m_x, fc.norm.weight, fc.norm.eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fc.branch_input(F.detach()), A_m_x.detach(), rtol=1e-5, atol=1e-6)
    if grad:
        names = ["F"] + [k for k, _ in fc.named_parameters()]
        for name, g, g_ref in zip(names, torch.autograd.grad((out * probe).sum(), params), grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_transposed_or_dropped_mixing_is_caught():
    """The formula test above rejects the two bugs the spec warns about (A_r^T for A_r, A_r
    dropped), and the same for A_m: each gives a clearly different output."""
    torch.manual_seed(0)
    m, d = 3, 12
    fc = live(FracConnection(d, m, branch_index=0, dynamic=False))
    F, branch = torch.randn(1, 4, m, d // m), torch.nn.Identity()
    A_m, A_r, B = reference_weights(fc, F)
    normed = lambda x: spec_rmsnorm(x, fc.norm.weight, fc.norm.eps)  # noqa: E731
    out = fc(F, branch)
    torch.testing.assert_close(out, reference_frac(F, A_m, A_r, B, normed), rtol=1e-5, atol=1e-5)
    for bad in (reference_frac(F, A_m, A_r.T, B, normed),  # transposed A_r
                reference_frac(F, A_m, torch.eye(m), B, normed),  # A_r dropped
                reference_frac(F, A_m.T, A_r, B, normed)):  # transposed A_m
        assert (out - bad).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic,use_tanh", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("m", [1, 2, 3, 12])
def test_fused_matches_plain_autograd_in_fp64(m, dynamic, use_tanh, device):
    d = 12
    fc = live(FracConnection(d, m, branch_index=1, dynamic=dynamic, use_tanh=use_tanh)).double().to(device)
    F0 = torch.randn(2, 5, m, d // m, dtype=torch.float64, device=device)
    w = torch.randn(d, d, dtype=torch.float64, device=device) / d**0.5

    def run(reference):
        F = F0.clone().requires_grad_(True)
        width = fc.width_connection_reference if reference else fc.width_connection
        depth = fc.depth_connection_reference if reference else fc.depth_connection
        x, ctx = width(F)
        out = depth(ctx, torch.tanh(x @ w))
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=device)).pow(2).sum()
        return out, torch.autograd.grad(loss, [F] + list(fc.parameters()))

    (out, grads), (out_ref, grads_ref) = run(False), run(True)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    names = ["F"] + [k for k, _ in fc.named_parameters()]
    assert len(grads) == len(grads_ref) == len(names)
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=name)


# ---------------------------------------------------------------------------------------------
# spec 8.3: the mixing is live
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_every_frac_parameter_gets_gradient_after_one_step(dynamic):
    torch.manual_seed(0)
    model = hb.build_model(tiny(pathway="frac", frac_rate=4, hc_dynamic=dynamic))
    opt = hb.make_optimizer(model, lr=1e-2)
    idx, tgt = batch(model.cfg)
    for _ in range(2):  # the gains multiply tanh(0) = 0 at init: they need one step first
        opt.zero_grad()
        model(idx, tgt)[1].backward()
        opt.step()
    frac_params = {k: p for k, p in model.named_parameters() if "static_" in k or "dynamic_" in k}
    assert len(frac_params) == model.cfg.n_branches * (6 if dynamic else 2)
    for name, p in frac_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        if "static_alpha" in name:  # every entry of A_m and A_r, not just the diagonal
            assert (p.grad != 0).all(), name


@pytest.mark.parametrize("part", ["A_m", "A_r", "B"])
def test_perturbing_the_connection_changes_the_output(part):
    torch.manual_seed(0)
    model = hb.build_model(tiny(pathway="frac", frac_rate=4, hc_dynamic=False))
    idx, _ = batch(model.cfg)
    before = model(idx)[0]
    path = model.blocks[1].attn_path
    with torch.no_grad():
        if part == "B":
            path.static_beta[2] += 0.1
        else:
            path.static_alpha[2, (0 if part == "A_m" else 4) + 1] += 0.1  # off-diagonal entry
    assert (model(idx)[0] - before).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# memory: F once (plus y for B's gradient), never the normed or mixed copies
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_connection_saves_only_the_state_and_the_branch_output(dynamic, autocast, saved_bytes):
    """Per token: F (d numbers, in bf16 under autocast) for the width node, y (d, in the branch
    output's dtype) for the depth node, plus O(m^2) per-token scalars for dynamic weights."""
    B, T, m, d = 2, 64, 4, 256
    fc = FracConnection(d, m, branch_index=0, dynamic=dynamic)
    params = {p.untyped_storage().data_ptr() for p in fc.parameters()}
    F = torch.randn(B, T, m, d // m, requires_grad=True)
    y = torch.randn(B, T, d, requires_grad=True)
    size = 2 if autocast else 4

    def step(reference):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                width = fc.width_connection_reference if reference else fc.width_connection
                depth = fc.depth_connection_reference if reference else fc.depth_connection
                x, ctx = width(F)
                depth(ctx, y.to(x.dtype) if not autocast else y.bfloat16())
        return run

    fused = saved_bytes(step(False), params)
    plain = saved_bytes(step(True), params)
    small = 4 * (B * T * (3 * m * (2 * m + 1) + m + 1) + 4 * (2 * m + 1) * (d // m))
    assert fused <= B * T * d * (size + 2 if autocast else 8) + small, fused
    assert fused < 0.7 * plain


def test_lm_saves_prenorm_plus_one_branch_output_per_branch(saved_bytes):
    """A whole LM step (static frac): exactly Pre-Norm's saved activations plus y per branch."""
    torch.manual_seed(0)
    shape = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=32)
    idx = torch.randint(0, 64, (2, 32))
    res = {}
    for name, kw in (("prenorm", {}), ("frac", dict(pathway="frac", frac_rate=4, hc_dynamic=False))):
        model = hb.build_model(hb.ModelConfig(**shape, **kw))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        res[name] = saved_bytes(lambda: model(idx, idx)[1], params)
    extra = res["frac"] - res["prenorm"]
    y_bytes = 4 * (2 * 2) * 2 * 32 * 64  # 4 bytes x 2L branches x (B, T, d)
    assert y_bytes <= extra <= y_bytes + 4 * 4 * 4  # + B (m floats) per branch


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_low_precision_parameters(dynamic, dtype, autocast):
    """bf16 / fp16 models, with and without bf16 autocast: logits within 4u and all gradients
    within 24u (relative L2, u the unit round-off) of the fp32 model; gradients in the parameter
    dtype. The same bounds as every other pathway (tests/pathways/test_dtypes.py)."""
    torch.manual_seed(0)
    ref = hb.build_model(hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                        max_seq_len=32, pathway="frac", frac_rate=4, hc_dynamic=dynamic))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("_scale"):
                p.fill_(0.5)
            elif "static_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "dynamic_" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    idx = torch.randint(0, 64, (2, 12), generator=g)
    logits_ref, loss_ref = ref(idx, idx.roll(-1, 1))
    loss_ref.backward()
    model = copy.deepcopy(ref).to(dtype)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert logits.dtype == (torch.bfloat16 if autocast else dtype)
    u = 2.0**-8 if autocast or dtype == torch.bfloat16 else 2.0**-11

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm())

    assert rel(logits, logits_ref) <= 4 * u
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
    grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    grads_ref = torch.cat([p.grad.flatten().double() for p in ref.parameters()])
    assert rel(grads, grads_ref) <= 24 * u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_state_keeps_its_dtype_and_the_connection_computes_in_fp32(dtype):
    fc = live(FracConnection(64, 4, branch_index=1))
    branch = torch.nn.Linear(64, 64)
    F = torch.randn(2, 3, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fc(F, branch).dtype == torch.float32  # fp32 state under autocast stays fp32
    low = copy.deepcopy(fc).to(dtype)
    F_low = F.to(dtype).requires_grad_(True)
    out = low(F_low, copy.deepcopy(branch).to(dtype))
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert F_low.grad.dtype == dtype and all(p.grad.dtype == dtype for p in low.parameters())
    # the mixed state is the exact (fp64) value rounded once, not computed in the low dtype
    exact = copy.deepcopy(low).double()
    with torch.no_grad():
        _, ctx = low.width_connection(F_low)
        _, ctx_exact = exact.width_connection(F_low.double())
    assert ctx.mixed.dtype == torch.float32
    torch.testing.assert_close(ctx.mixed.double(), ctx_exact.mixed, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# state, shapes, construction, weight decay
# ---------------------------------------------------------------------------------------------
def test_expand_is_a_view_and_reduce_concatenates():
    fc = FracConnection(12, 3, branch_index=0)
    h = torch.randn(2, 5, 12)
    F = fc.expand(h)
    assert F.shape == (2, 5, 3, 4) and F.data_ptr() == h.data_ptr()  # no copy
    assert torch.equal(F[..., 1, :], h[..., 4:8])  # fraction 1 is features 4..7
    assert torch.equal(fc.reduce(F), h)  # concatenation, not a sum


def one_line_error(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


@pytest.mark.parametrize("grad", [True, False], ids=["fused", "no_grad"])
def test_shape_mistakes_are_one_line_errors(grad):
    fc = FracConnection(16, 4, branch_index=0)
    branch = torch.nn.Linear(16, 16)
    with torch.set_grad_enabled(grad):
        for bad in (torch.randn(2, 4, 16), torch.randn(2, 3, 2, 8)):  # (B, T, d) with T == m; wrong m
            for call in (lambda: fc(bad, branch), lambda: fc.width_connection(bad),
                         lambda: fc.connection_weights(bad), lambda: fc.reduce(bad), lambda: fc.skip(bad)):
                one_line_error(call, "(B, T, 4, 4)", f"got shape {tuple(bad.shape)}")
        one_line_error(lambda: fc.expand(torch.randn(2, 3, 4, 4)), "(B, T, 16)")
        _, ctx = fc.width_connection(torch.randn(2, 3, 4, 4))
        one_line_error(lambda: fc.depth_connection(ctx, torch.randn(2, 3, 8)), "(2, 3, 16)")
    one_line_error(lambda: FracConnection(10, 4, 0), "dim=10", "frac_rate=4")
    one_line_error(lambda: FracConnection(8, 0, 0), "frac_rate")


def test_make_pathway_builds_it_and_the_config_validates():
    fc = make_pathway("frac", 16, 3, frac_rate=4, dynamic=False, use_tanh=False, eps=1e-5)
    assert isinstance(fc, FracConnection) and (fc.frac_rate, fc.dynamic, fc.norm.eps) == (4, False, 1e-5)
    assert fc.expansion_rate == 1
    with pytest.raises(hb.ConfigError, match="frac_rate"):
        tiny(pathway="frac", frac_rate=5)
    with pytest.raises(hb.ConfigError, match="expansion_rate"):
        tiny(pathway="frac", frac_rate=2, expansion_rate=2)


@pytest.mark.parametrize("dynamic", [False, True])
def test_weight_decay_groups(dynamic):
    model = hb.build_model(tiny(pathway="frac", frac_rate=2, hc_dynamic=dynamic))
    decay, keep = hb.param_groups(model, 0.1)[:2]
    name_of = {id(p): n for n, p in model.named_parameters()}
    keep = {name_of[id(p)] for p in keep["params"]}
    decay = {name_of[id(p)] for p in decay["params"]}
    for i in range(3):
        for path in ("attn_path", "ffn_path"):
            pre = f"blocks.{i}.{path}."
            assert {pre + "static_alpha", pre + "static_beta", pre + "norm.weight"} <= keep
            if dynamic:
                assert {pre + "dynamic_alpha_scale", pre + "dynamic_beta_scale"} <= keep
                assert {pre + "dynamic_alpha_fn", pre + "dynamic_beta_fn"} <= decay

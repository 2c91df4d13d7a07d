"""Spec section 8, items 1-4: every pathway is exact where the math says it is.

The reference implementations here are written independently of ``hyperbit.pathways`` as plain
loops over streams, straight from the spec's formulas, so a transposed or dropped mixing in the
library cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import pytest
import torch

import hyperbit as hb
from hyperbit.pathways import HyperConnection, expand_streams, reduce_streams

torch.set_default_dtype(torch.float32)


def tiny(**kw) -> hb.ModelConfig:
    # 3 blocks = 6 branches, so k mod n wraps for n = 4 and groups of n are exercised.
    base = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return hb.ModelConfig(**{**base, **kw})


def batch(cfg, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def randomise(model: torch.nn.Module, seed: int = 1, matrices: bool = True) -> None:
    """Give every parameter (norm gains included) a random, non-trivial value; with
    ``matrices=False`` only the norm gains (weight matrices keep their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "static_" in name or "dynamic_" in name or (p.ndim > 1 and not matrices):
                continue
            scale = 0.3 if p.ndim == 1 else 0.15
            base = 1.0 if p.ndim == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))


def shared_grads(model, ref):
    ref_params = dict(ref.named_parameters())
    return {k: (p.grad, ref_params[k].grad) for k, p in model.named_parameters() if k in ref_params}


# ---------------------------------------------------------------------------------------------
# 1 + 2: hyper-connections at init equal Pre-Norm (whole LM, forward and gradients, fp32)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("linear", ["fp", "bitnet"])
@pytest.mark.parametrize("weights", ["init", "random"])
def test_hc_at_init_equals_prenorm(weights, n, dynamic, linear):
    """The same config values, nothing adjusted: the HC model's final norm uses eps * n^2 because
    it reads the sum of n equal streams (models/lm.py). "init" keeps the init's small weights, where
    the final-norm eps matters (with the Pre-Norm eps, 5e-4 to 6e-4 on the logits for n = 2..8);
    "random" gives every layer large, non-trivial weights."""
    torch.manual_seed(0)
    ref = hb.build_model(tiny(linear=linear))
    randomise(ref, matrices=weights == "random")
    model = hb.build_model(tiny(linear=linear, pathway="hc", expansion_rate=n, hc_dynamic=dynamic))
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all("static_" in k or "dynamic_" in k for k in missing)

    idx, tgt = batch(ref.cfg)
    logits_ref, loss_ref = ref(idx, tgt)
    logits, loss = model(idx, tgt)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-5)
    loss_ref.backward()
    loss.backward()
    grads = shared_grads(model, ref)
    assert len(grads) == len(list(ref.parameters()))
    for name, (g, g_ref) in grads.items():
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5, msg=name)


def test_static_hc_n1_is_exactly_prenorm():
    torch.manual_seed(0)
    ref = hb.build_model(tiny())
    randomise(ref)
    model = hb.build_model(tiny(pathway="hc", expansion_rate=1, hc_dynamic=False))
    model.load_state_dict(ref.state_dict(), strict=False)
    idx, tgt = batch(ref.cfg)
    logits_ref, loss_ref = ref(idx, tgt)
    logits, loss = model(idx, tgt)
    assert torch.equal(logits, logits_ref)  # bitwise: multiplying by 1.0 and adding 0.0 is exact
    loss_ref.backward()
    loss.backward()
    for name, (g, g_ref) in shared_grads(model, ref).items():
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-8, msg=name)


# ---------------------------------------------------------------------------------------------
# The connection itself against the spec's formulas, with random, non-symmetric weights
# ---------------------------------------------------------------------------------------------
def reference_hc(H, alpha, beta, branch):
    """Spec sections 2-3 as loops. H: (B, T, n, d); alpha: (..., n, n+1); beta: (..., n)."""
    n = H.shape[-2]
    A_m, A_r = alpha[..., :, 0], alpha[..., :, 1:]  # (..., n), (..., n, n)
    x = sum(A_m[..., i, None] * H[..., i, :] for i in range(n))  # x = A_m^T H
    y = branch(x)
    out = []
    for j in range(n):
        mixed_j = sum(A_r[..., i, j, None] * H[..., i, :] for i in range(n))  # (A_r^T H)_j
        out.append(beta[..., j, None] * y + mixed_j)  # beta_j T(x) + H'_j
    return torch.stack(out, dim=-2)


def reference_dynamic_weights(hc: HyperConnection, H):
    """Spec section 3: alpha(H) = s_a * tanh(norm(H) W_a) + alpha, beta likewise."""
    Hn = H * torch.rsqrt(H.pow(2).mean(-1, keepdim=True) + hc.stream_norm.eps)
    a = torch.einsum("btnd,dk->btnk", Hn, hc.dynamic_alpha_fn)
    b = torch.einsum("btnd,d->btn", Hn, hc.dynamic_beta_fn)
    if hc.use_tanh:
        a, b = a.tanh(), b.tanh()
    return hc.dynamic_alpha_scale * a + hc.static_alpha, hc.dynamic_beta_scale * b + hc.static_beta


@pytest.mark.parametrize("dynamic,use_tanh", [(False, True), (True, True), (True, False)])
def test_hyper_connection_matches_spec_formula(dynamic, use_tanh):
    torch.manual_seed(0)
    n, d = 3, 16
    hc = HyperConnection(d, n, branch_index=1, dynamic=dynamic, use_tanh=use_tanh, branch_norm=False)
    with torch.no_grad():
        for p in hc.parameters():
            p.copy_(torch.randn_like(p))  # non-symmetric A_r, non-zero dynamic weights
    H = torch.randn(2, 5, n, d)
    branch = torch.nn.Linear(d, d)
    alpha, beta = reference_dynamic_weights(hc, H) if dynamic else (hc.static_alpha, hc.static_beta)
    torch.testing.assert_close(hc(H, branch), reference_hc(H, alpha, beta, branch), rtol=1e-5, atol=1e-5)


def test_transposed_or_dropped_mixing_is_caught():
    """The formula test above must reject the two bugs the spec warns about."""
    torch.manual_seed(0)
    n, d = 3, 8
    hc = HyperConnection(d, n, branch_index=0, dynamic=False, branch_norm=False)
    with torch.no_grad():
        hc.static_alpha.copy_(torch.randn(n, n + 1))
    H, branch = torch.randn(1, 4, n, d), torch.nn.Identity()
    good = reference_hc(H, hc.static_alpha, hc.static_beta, branch)
    alpha_t = torch.cat([hc.static_alpha[:, :1], hc.static_alpha[:, 1:].T], dim=1)
    transposed = reference_hc(H, alpha_t, hc.static_beta, branch)
    dropped = reference_hc(H, torch.cat([hc.static_alpha[:, :1], torch.eye(n)], 1), hc.static_beta, branch)
    out = hc(H, branch)
    torch.testing.assert_close(out, good)
    assert (out - transposed).abs().max() > 1e-2
    assert (out - dropped).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 3: the mixing is live
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [False, True])
def test_every_hc_parameter_gets_gradient_after_one_step(dynamic):
    torch.manual_seed(0)
    model = hb.build_model(tiny(pathway="hc", expansion_rate=4, hc_dynamic=dynamic))
    opt = hb.make_optimizer(model, lr=1e-2)
    idx, tgt = batch(model.cfg)
    for _ in range(2):  # gains s_a, s_b multiply tanh(0) = 0 at init: they need one step first
        opt.zero_grad()
        model(idx, tgt)[1].backward()
        opt.step()
    hc_params = {k: p for k, p in model.named_parameters() if "static_" in k or "dynamic_" in k}
    assert len(hc_params) == model.cfg.n_branches * (6 if dynamic else 2)
    for name, p in hc_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_perturbing_stream_mixing_changes_output():
    torch.manual_seed(0)
    model = hb.build_model(tiny(pathway="hc", expansion_rate=4, hc_dynamic=False))
    idx, _ = batch(model.cfg)
    before = model(idx)[0]
    with torch.no_grad():
        model.blocks[1].attn_path.static_alpha[2, 1:] += 0.1  # A_r row of stream 2
    assert (model(idx)[0] - before).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# 4: sequential and parallel presets reproduce those networks exactly
# ---------------------------------------------------------------------------------------------
def branches(model):
    """(norm, branch module) of each of the 2L branches, in execution order."""
    out = []
    for b in model.blocks:
        out += [(b.attn_path.norm, b.attn), (b.ffn_path.norm, b.ffn)]
    return out


@pytest.mark.parametrize("weights", ["init", "random"])  # the final-norm eps matters at init
def test_sequential_preset_is_a_sequential_residual_network(weights):
    torch.manual_seed(0)
    model = hb.build_model(tiny(pathway="sequential", expansion_rate=2))
    randomise(model, matrices=weights == "random")
    idx, _ = batch(model.cfg)
    h = model.embed(idx)
    for norm, branch in branches(model):
        h = h + branch(norm(h))  # plain Pre-Norm on each (identical) stream
    # the same config's Pre-Norm final norm (eps = norm_eps) on one stream: the model's final
    # norm reads the sum 2h with eps * 2^2, which is the same thing
    expected = model.head(spec_rmsnorm(h, model.final_norm.weight, model.cfg.norm_eps))
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("weights", ["init", "random"])
def test_parallel_preset_runs_groups_of_n_branches_in_parallel(weights, n):
    torch.manual_seed(0)
    # the stream sum grows n-fold per group: a large eps, so that the final norm's eps matters
    model = hb.build_model(tiny(pathway="parallel", expansion_rate=n, norm_eps=1e-3))
    randomise(model, matrices=weights == "random")
    idx, _ = batch(model.cfg)
    s = n * model.embed(idx)  # the stream sum after expand
    pairs = branches(model)
    for g in range(0, len(pairs), n):
        # every branch of the group reads the same s; each keeps its own residual copy of s
        s = n * s + sum(branch(norm(s)) for norm, branch in pairs[g:g + n])
    # the final norm of an n-stream model reads the stream sum with eps * n^2 (models/lm.py):
    # the stream mean s / n normalised with the config's eps
    expected = model.head(spec_rmsnorm(s / n, model.final_norm.weight, model.cfg.norm_eps))
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)


def test_parallel_matrices_match_spec_for_n2():
    from hyperbit.pathways import parallel_matrix
    assert torch.equal(parallel_matrix(2, 0), torch.tensor([[0.0, 1, 0], [1, 1, 1], [1, 1, 1]]))
    assert torch.equal(parallel_matrix(2, 1), torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]]))


# ---------------------------------------------------------------------------------------------
# expand / reduce and the user-facing API
# ---------------------------------------------------------------------------------------------
def test_expand_reduce_roundtrip_and_gradient():
    h = torch.randn(2, 3, 8, requires_grad=True)
    H = expand_streams(h, 4)
    assert H.shape == (2, 3, 4, 8)
    torch.testing.assert_close(reduce_streams(H), 4 * h)
    reduce_streams(H).sum().backward()
    torch.testing.assert_close(h.grad, torch.full_like(h, 4.0))


def spec_rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("dynamic", [False, True])
def test_width_and_depth_connection_match_the_spec_formula(dynamic):
    """The two halves a user calls by hand (and ``forward``, made of them), with the branch norm,
    against the spec's formulas written out here: values and gradients (the fused backward)."""
    torch.manual_seed(0)
    n, d = 4, 16
    hc = HyperConnection(d, n, branch_index=2, dynamic=dynamic)
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-symmetric A_r, live dynamic weights, norm gain
    H = torch.randn(2, 5, n, d, requires_grad=True)
    branch = torch.nn.Linear(d, d)
    probe = torch.randn(2, 5, n, d)  # a loss that weighs every output element differently

    alpha, beta = reference_dynamic_weights(hc, H) if dynamic else (hc.static_alpha, hc.static_beta)
    A_m = alpha[..., :, 0]
    x_ref = spec_rmsnorm(sum(A_m[..., i, None] * H[..., i, :] for i in range(n)), hc.norm.weight,
                         hc.norm.eps)  # norm(A_m^T H)
    out_ref = reference_hc(H, alpha, beta, lambda x: branch(spec_rmsnorm(x, hc.norm.weight, hc.norm.eps)))
    params = [H] + list(hc.parameters())
    grads_ref = torch.autograd.grad((out_ref * probe).sum(), params)

    x, ctx = hc.width_connection(H)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    out = hc.depth_connection(ctx, branch(x))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(["H"] + [k for k, _ in hc.named_parameters()],
                              torch.autograd.grad((out * probe).sum(), params), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(hc(H, branch), out_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the plain (inference) path
        torch.testing.assert_close(hc(H, branch), out_ref, rtol=1e-5, atol=1e-5)

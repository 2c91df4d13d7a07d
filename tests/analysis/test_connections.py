"""The unfolded connection matrix and composite gain: hand-computed cases and the real model."""

from __future__ import annotations

import torch

import hyperbit as hb
from hyperbit.analysis.connections import composite_gain, model_branch_weights, unfold


def tiny(**kw):
    return hb.build_model(hb.ModelConfig(**{**dict(vocab_size=64, dim=32, n_layers=2, n_heads=4,
                                                    max_seq_len=16), **kw}))


def test_prenorm_is_ones_on_and_below_the_diagonal():
    C = unfold(model_branch_weights(tiny()))
    assert torch.equal(C, torch.tril(torch.ones(5, 5, dtype=torch.float64)))


def test_hc_at_init_and_sequential_preset_are_pre_norm_with_n_summed_streams():
    for model, n in ((tiny(pathway="hc", expansion_rate=3, hc_dynamic=False), 3),
                     (tiny(pathway="sequential", expansion_rate=2), 2)):
        C = unfold(model_branch_weights(model))
        assert torch.equal(C[:-1], torch.tril(torch.ones(4, 5, dtype=torch.float64)))
        assert torch.equal(C[-1], torch.full((5,), float(n), dtype=torch.float64))


def test_parallel_preset_matches_the_hand_computed_pattern():
    # s0 = 2e; branches 1, 2 read s0; s1 = 2 s0 + T1 + T2 = 4e + T1 + T2 feeds branches 3, 4;
    # the output is s2 = 2 s1 + T3 + T4 = 8e + 2 T1 + 2 T2 + T3 + T4.
    expected = torch.tensor([[2.0, 0, 0, 0, 0],
                             [2, 0, 0, 0, 0],
                             [4, 1, 1, 0, 0],
                             [4, 1, 1, 0, 0],
                             [8, 2, 2, 1, 1]], dtype=torch.float64)
    assert torch.equal(unfold(model_branch_weights(tiny(pathway="parallel", expansion_rate=2))), expected)


def test_composite_gain_of_parallel_and_prenorm():
    rows, cols = composite_gain(model_branch_weights(tiny(pathway="parallel", expansion_rate=2)))
    assert rows.tolist() == [2.0, 2.0, 4.0, 4.0] and cols.tolist() == [2.0, 2.0, 4.0, 4.0]  # J, J, 2J, 2J
    rows, cols = composite_gain(model_branch_weights(tiny()))
    assert rows.tolist() == cols.tolist() == [1.0] * 4


def test_unfolded_coefficients_reproduce_the_real_branch_inputs():
    """With random static weights, every branch input A_m^T H equals sum_j c_kj T_j, where T_0 is
    the embedding and T_j the captured branch outputs; the output row gives the final-norm input."""
    torch.manual_seed(0)
    model = tiny(pathway="hc", expansion_rate=3, hc_dynamic=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "static_" in name:
                p.copy_(torch.randn_like(p) * 0.7)
    C = unfold(model_branch_weights(model)).float()
    idx = torch.randint(0, 64, (2, 8))
    outputs, inputs = [model.embed(idx).detach()], []
    hooks = []
    for block in model.blocks:
        for branch, path in ((block.attn, block.attn_path), (block.ffn, block.ffn_path)):
            hooks.append(branch.register_forward_hook(lambda m, a, out: outputs.append(out.detach())))
            hooks.append(path.register_forward_pre_hook(
                lambda m, a: inputs.append((a[0].detach() * m.static_alpha[:, 0, None]).sum(-2))))
    final = []
    hooks.append(model.final_norm.register_forward_pre_hook(lambda m, a: final.append(a[0].detach())))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    for k, x in enumerate(inputs + final):
        mixed = sum(C[k, j] * outputs[j] for j in range(k + 1))
        torch.testing.assert_close(mixed, x, rtol=1e-4, atol=1e-5, msg=f"row {k}")


def test_dynamic_weights_are_averaged_over_tokens():
    torch.manual_seed(0)
    model = tiny(pathway="hc", expansion_rate=2)
    idx = torch.randint(0, 64, (2, 8))
    at_init = model_branch_weights(model, idx)
    assert all(torch.allclose(b.a_r, torch.eye(2)) and torch.allclose(b.beta, torch.ones(2)) for b in at_init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dynamic_" in name and "fn" in name:
                p.copy_(torch.randn_like(p))
    path = model.pathways()[1]
    states = []
    hook = path.register_forward_pre_hook(lambda m, a: states.append(a[0]))
    with torch.no_grad():
        model(idx)
    hook.remove()
    alpha, beta = path.connection_weights(states[0])
    got = model_branch_weights(model, idx)[1]
    torch.testing.assert_close(got.a_r, alpha[..., 1:].mean((0, 1)))
    torch.testing.assert_close(got.beta, beta.mean((0, 1)))
    assert not torch.allclose(got.a_r, torch.eye(2))  # the dynamic part is live

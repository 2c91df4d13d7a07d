"""Collapse metric: constructed inputs with known cosines, and the model's real branch inputs."""

from __future__ import annotations

import math

import torch

import hyperbit as hb
from hyperbit.analysis.collapse import branch_inputs, collapse, consecutive_cosine


def test_known_angles():
    d, tokens = 8, 100
    e0, e1 = torch.zeros(d), torch.zeros(d)
    e0[0], e1[1] = 1.0, 1.0
    a = e0.expand(tokens, d)
    same, orth = 3.0 * a, e1.expand(tokens, d)
    sixty = (math.cos(math.pi / 3) * e0 + math.sin(math.pi / 3) * e1).expand(tokens, d)
    stats = consecutive_cosine([a, same, orth, sixty])
    torch.testing.assert_close(stats["median"], torch.tensor([1.0, 0.0, math.sin(math.pi / 3)]))
    torch.testing.assert_close(stats["p05"], stats["median"])  # every token alike: no band


def test_band_covers_the_spread_of_tokens():
    torch.manual_seed(0)
    angles = torch.linspace(0, math.pi, 101)  # cosines spread uniformly in angle over [-1, 1]
    a = torch.stack([torch.ones_like(angles), torch.zeros_like(angles)], -1)
    b = torch.stack([angles.cos(), angles.sin()], -1)
    stats = consecutive_cosine([a, b])
    torch.testing.assert_close(stats["median"], torch.tensor([0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["p05"], torch.tensor([math.cos(0.95 * math.pi)]), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats["p95"], torch.tensor([math.cos(0.05 * math.pi)]), atol=1e-4, rtol=0)


def test_model_branch_inputs_are_what_the_branches_read():
    torch.manual_seed(0)
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16,
                         pathway="hc", expansion_rate=2)
    model = hb.build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dynamic_" in name or "static_" in name:
                p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 64, (2, 8))
    xs = branch_inputs(model, idx)
    normed = []  # what each branch module actually receives: norm(x_k)
    hooks = [m.register_forward_pre_hook(lambda mod, a: normed.append(a[0]))
             for b in model.blocks for m in (b.attn, b.ffn)]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    for x, got, path in zip(xs, normed, model.pathways()):
        torch.testing.assert_close(path.norm(x), got, rtol=1e-5, atol=1e-5)

    # The quantiles collapse() reports, computed independently from what the branches received:
    # norm(x) = x / rms(x) * weight, so dividing out the weight leaves x scaled per token, which
    # has x's cosines. Cosines in float64 by hand, quantiles by sorting and interpolating.
    def quantile(values: list[float], q: float) -> float:
        v = sorted(values)
        pos = q * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    unscaled = [(got / path.norm.weight).detach().double().reshape(-1, cfg.dim)
                for got, path in zip(normed, model.pathways())]
    expected = {"p05": [], "median": [], "p95": []}
    for a, b in zip(unscaled, unscaled[1:]):
        cos = [float(u @ v / (u.norm() * v.norm())) for u, v in zip(a, b)]
        assert len(cos) == 16  # one per token of the (2, 8) batch
        for key, q in (("p05", 0.05), ("median", 0.5), ("p95", 0.95)):
            expected[key].append(quantile(cos, q))
    stats = collapse(model, idx)
    for key, values in expected.items():
        torch.testing.assert_close(stats[key].double(), torch.tensor(values, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
    # the band is a real spread (cosines 0.985-0.99997 here): neighbouring quantiles differ by
    # over 20x the tolerance, so the test tells them apart
    assert all(b - a > 2e-4 for key_a, key_b in (("p05", "median"), ("median", "p95"))
               for a, b in zip(expected[key_a], expected[key_b]))

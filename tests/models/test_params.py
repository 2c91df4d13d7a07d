"""Parameter counts (analytic vs real, and against the spec's per-branch HC formulas), optimizer
weight-decay groups, and the init std of branch output projections."""

from __future__ import annotations

import math

import pytest
import torch

from hyperbit import ModelConfig, build_model, count_params, make_optimizer, param_groups, preset
from hyperbit.pathways import HyperConnection, output_std_scale

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=16)

COUNT_CASES = {
    "prenorm": dict(),
    "postnorm": dict(pathway="postnorm"),
    **{f"shc{n}": dict(pathway="hc", expansion_rate=n, hc_dynamic=False) for n in (1, 2, 4)},
    **{f"dhc{n}": dict(pathway="hc", expansion_rate=n) for n in (1, 2, 4)},
    "dhc4-notanh": dict(pathway="hc", expansion_rate=4, hc_tanh=False),
    "sequential": dict(pathway="sequential", expansion_rate=2),
    "parallel2": dict(pathway="parallel", expansion_rate=2),
    "parallel4": dict(pathway="parallel", expansion_rate=4),
    "tied": dict(tie_embeddings=True),
    "tied-dhc4": dict(tie_embeddings=True, pathway="hc", expansion_rate=4),
    "gqa2": dict(n_kv_heads=2),
    "mqa-shc2": dict(n_kv_heads=1, pathway="hc", expansion_rate=2, hc_dynamic=False),
    "subln": dict(subln=True),
    "bitnet": dict(linear="bitnet"),  # subln on by default
    "bitnet-nosubln-dhc2": dict(linear="bitnet", subln=False, pathway="hc", expansion_rate=2),
    "relu2": dict(ffn="relu2"),
    "ffn_hidden": dict(ffn_hidden=48, pathway="hc", expansion_rate=4),
    "everything": dict(tie_embeddings=True, n_kv_heads=1, linear="bitnet", ffn="relu2",
                       pathway="hc", expansion_rate=4, n_layers=3),
}


def real_count(model: torch.nn.Module) -> int:
    """Independent of num_params: every distinct parameter tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("name", COUNT_CASES)
def test_num_params_matches_analytic_count(name):
    cfg = ModelConfig(**{**TINY, **COUNT_CASES[name]})
    model = build_model(cfg, "meta")
    assert model.num_params() == real_count(model) == count_params(cfg)


def test_num_params_on_cpu_and_exclude_embeddings():
    for kw in (dict(), dict(tie_embeddings=True, pathway="hc", expansion_rate=2)):
        cfg = ModelConfig(**TINY, **kw)
        model = build_model(cfg)
        assert model.num_params() == count_params(cfg)
        assert model.num_params(exclude_embeddings=True) == count_params(cfg) - cfg.vocab_size * cfg.dim


def test_tied_embeddings_share_one_tensor():
    untied = count_params(ModelConfig(**TINY))
    tied = count_params(ModelConfig(**TINY, tie_embeddings=True))
    assert untied - tied == TINY["vocab_size"] * TINY["dim"]


def test_olmo_1b_counts_on_meta():
    base = preset("olmo-1b")
    # embedding (tied head) 50304*2048 + 16 blocks * (4*2048^2 attn + 3*2048*8192 FFN + 2*2048
    # norms) + final norm 2048
    expected = 50304 * 2048 + 16 * (4 * 2048**2 + 3 * 2048 * 8192 + 2 * 2048) + 2048
    assert expected == 1_176_832_000
    model = build_model(base, "meta")
    assert model.embed.weight.is_meta
    assert model.num_params() == count_params(base) == expected

    hc = preset("olmo-1b", pathway="hc", expansion_rate=4, hc_dynamic=True)
    hc_model = build_model(hc, "meta")
    d, n, L = 2048, 4, 16
    overhead = 2 * L * (d * (n + 2) + n * (n + 2) + 2)  # DHC per-branch formula, spec section 3
    assert hc_model.num_params() == count_params(hc) == expected + overhead == 1_177_226_048


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dim, n_layers", [(32, 2), (64, 3)])
def test_hc_overhead_matches_spec_formulas(n, dim, n_layers):
    shape = dict(vocab_size=50, dim=dim, n_layers=n_layers, n_heads=4, max_seq_len=8)
    d, L = dim, n_layers
    prenorm = build_model(ModelConfig(**shape), "meta").num_params()
    shc = build_model(ModelConfig(**shape, pathway="hc", expansion_rate=n, hc_dynamic=False), "meta")
    dhc = build_model(ModelConfig(**shape, pathway="hc", expansion_rate=n, hc_dynamic=True), "meta")
    # Spec section 3, per branch: SHC n(n+2); DHC d(n+2) + n(n+2) + 2 (+ 0: the stream norm has
    # no parameters). The branch norm exists in both models and cancels.
    assert shc.num_params() - prenorm == 2 * L * n * (n + 2)
    assert dhc.num_params() - prenorm == 2 * L * (d * (n + 2) + n * (n + 2) + 2)


@pytest.mark.parametrize("n, dynamic", [(1, False), (2, False), (4, False), (1, True), (4, True)])
def test_one_hyper_connection_param_count(n, dynamic):
    d = 24
    hc = HyperConnection(d, n, branch_index=3, dynamic=dynamic, branch_norm=False)
    expected = n * (n + 2) + ((d * (n + 2) + 2) if dynamic else 0)
    assert sum(p.numel() for p in hc.parameters()) == expected


@pytest.mark.parametrize("pathway, n", [("sequential", 2), ("parallel", 2), ("parallel", 4)])
def test_fixed_presets_have_buffers_not_parameters(pathway, n):
    cfg = ModelConfig(**TINY, pathway=pathway, expansion_rate=n)
    model = build_model(cfg)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert not any("static_" in name or "dynamic_" in name for name in params)
    for i in range(cfg.n_layers):
        for path in ("attn_path", "ffn_path"):
            assert f"blocks.{i}.{path}.static_alpha" in buffers
            assert f"blocks.{i}.{path}.static_beta" in buffers
    assert model.num_params() == build_model(ModelConfig(**TINY), "meta").num_params()
    groups = param_groups(model, 0.1)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not any(id(b) in grouped for b in buffers.values())


# --- weight-decay groups ----------------------------------------------------------------------

NO_DECAY_SUFFIXES = ("static_alpha", "static_beta", "dynamic_alpha_scale", "dynamic_beta_scale",
                     "norm.weight", "attn_sub_norm.weight", "ffn_sub_norm.weight")
DECAY_SUFFIXES = ("dynamic_alpha_fn", "dynamic_beta_fn", "_proj.weight", "embed.weight",
                  "head.weight")


def grouped_names(model, weight_decay=0.1):
    groups = param_groups(model, weight_decay)
    assert [g["weight_decay"] for g in groups] == [weight_decay, 0.0]
    name_of = {id(p): name for name, p in model.named_parameters()}  # shared tensors: first name
    decay = [name_of[id(p)] for p in groups[0]["params"]]
    keep = [name_of[id(p)] for p in groups[1]["params"]]
    return decay, keep


@pytest.mark.parametrize("kw", [
    dict(pathway="hc", expansion_rate=4),  # DHC
    dict(pathway="hc", expansion_rate=2, hc_dynamic=False),  # SHC
    dict(pathway="hc", expansion_rate=4, linear="bitnet", tie_embeddings=True),  # + sub-norms
    dict(),  # prenorm
    dict(pathway="postnorm", subln=True),
], ids=["dhc4", "shc2", "dhc4-bitnet-tied", "prenorm", "postnorm-subln"])
def test_param_groups_split(kw):
    cfg = ModelConfig(**TINY, **kw)
    model = build_model(cfg)
    decay, keep = grouped_names(model)
    # every trainable parameter exactly once
    all_names = [n for n, _ in model.named_parameters()]
    assert sorted(decay + keep) == sorted(all_names)
    assert len(set(decay + keep)) == len(decay + keep)
    for name in keep:
        assert name.endswith(NO_DECAY_SUFFIXES), f"{name} must be decayed"
    for name in decay:
        assert name.endswith(DECAY_SUFFIXES), f"{name} must not be decayed"
    assert "final_norm.weight" in keep and "embed.weight" in decay
    for i in range(cfg.n_layers):
        for path in ("attn_path", "ffn_path"):
            assert f"blocks.{i}.{path}.norm.weight" in keep
            if cfg.pathway == "hc":
                assert f"blocks.{i}.{path}.static_alpha" in keep
                assert f"blocks.{i}.{path}.static_beta" in keep
            if cfg.pathway == "hc" and cfg.hc_dynamic:
                assert f"blocks.{i}.{path}.dynamic_alpha_scale" in keep
                assert f"blocks.{i}.{path}.dynamic_beta_scale" in keep
                assert f"blocks.{i}.{path}.dynamic_alpha_fn" in decay
                assert f"blocks.{i}.{path}.dynamic_beta_fn" in decay
        if cfg.subln:
            assert f"blocks.{i}.attn.attn_sub_norm.weight" in keep
            assert f"blocks.{i}.ffn.ffn_sub_norm.weight" in keep
        for proj in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                     "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"):
            assert f"blocks.{i}.{proj}.weight" in decay
    assert ("head.weight" in decay) == (not cfg.tie_embeddings)


def test_param_groups_skip_frozen_and_count_tied_once():
    model = build_model(ModelConfig(**TINY, tie_embeddings=True, pathway="hc", expansion_rate=2))
    model.blocks[0].attn.q_proj.weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert id(model.blocks[0].attn.q_proj.weight) not in ids
    assert ids.count(id(model.embed.weight)) == 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


# --- init std of branch output projections ----------------------------------------------------

INIT = dict(vocab_size=512, dim=256, n_layers=3, n_heads=4, ffn_hidden=512, max_seq_len=16,
            init_std=0.05)  # 2L = 6 and n = 4 give different factors, so a swap is caught


def weight_stds(cfg: ModelConfig) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg)
    return {name: p.detach().std().item() for name, p in model.named_parameters()
            if name.endswith(("_proj.weight", "embed.weight", "head.weight"))}


@pytest.mark.parametrize("kw, n", [(dict(), 1),
                                   (dict(pathway="hc", expansion_rate=4), 4),
                                   (dict(pathway="hc", expansion_rate=2, hc_dynamic=False), 2),
                                   (dict(pathway="parallel", expansion_rate=4), 4)],
                         ids=["prenorm", "dhc4", "shc2", "parallel4"])
def test_output_projection_init_std(kw, n):
    cfg = ModelConfig(**INIT, **kw)
    std, L = cfg.init_std, cfg.n_layers
    out_std = std / math.sqrt(2 * L) / math.sqrt(n)
    stds = weight_stds(cfg)
    assert len(stds) == 7 * L + 2
    for name, value in stds.items():
        expected = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        assert value == pytest.approx(expected, rel=0.03), name  # >= 65k samples: ~0.3% noise


def test_hc_output_projection_output_std_is_baseline_over_sqrt_n():
    n = 4
    torch.manual_seed(0)
    pre = build_model(ModelConfig(**INIT))
    hc = build_model(ModelConfig(**INIT, pathway="hc", expansion_rate=n))
    x = torch.randn(4096, INIT["dim"])  # unit-variance input
    with torch.no_grad():
        for i in range(INIT["n_layers"]):
            base = pre.blocks[i].attn.o_proj(x).std().item()
            assert base == pytest.approx(INIT["init_std"] / math.sqrt(2 * INIT["n_layers"])
                                         * math.sqrt(INIT["dim"]), rel=0.05)
            out = hc.blocks[i].attn.o_proj(x).std().item()
            assert out == pytest.approx(base / math.sqrt(n), rel=0.05)
            assert out == pytest.approx(base * output_std_scale(n), rel=0.05)


@pytest.mark.parametrize("kw,streams", [(dict(), 1), (dict(pathway="postnorm"), 1),
                                        (dict(pathway="hc", expansion_rate=1), 1),
                                        (dict(pathway="hc", expansion_rate=3, hc_dynamic=False), 3),
                                        (dict(pathway="hc", expansion_rate=8), 8),
                                        (dict(pathway="sequential", expansion_rate=2), 2),
                                        (dict(pathway="parallel", expansion_rate=4), 4)])
def test_final_norm_eps_is_scaled_by_the_streams_summed(kw, streams):
    """The final norm reads the sum of n streams: eps * n^2 normalises it as Pre-Norm's eps
    normalises one stream (every other norm keeps norm_eps)."""
    cfg = ModelConfig(**{**TINY, "norm_eps": 1e-5}, **kw)
    model = build_model(cfg)
    assert model.final_norm.eps == pytest.approx(1e-5 * streams**2, rel=1e-12)
    others = {m.eps for name, m in model.named_modules()
              if hasattr(m, "eps") and name != "final_norm"}
    assert others == {1e-5}
    h = torch.randn(2, 3, cfg.dim) * 1e-3  # small enough that eps matters
    torch.testing.assert_close(model.final_norm(streams * h),
                               h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5), rtol=1e-5, atol=1e-6)

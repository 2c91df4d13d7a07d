"""A transformer LM with mixture-of-experts FFNs (``ffn="moe"``): parameter counts (analytic,
active, the OLMoE-1B-7B preset), init, the training objective (cross-entropy + auxiliary losses,
evaluation cross-entropy only), learning, the wiring check under several pathways, dtypes, and the
auxiliary values logged by ``hyperbit train``."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

import hyperbit as hb
from hyperbit.analysis import check_wiring
from hyperbit.cli import main
from hyperbit.config import preset
from hyperbit.nn.moe import ExpertLinear, MoEFeedForward
from hyperbit.train import resolve_run_config

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32, ffn="moe", ffn_hidden=48,
            moe_experts=4, moe_top_k=2)


def tiny(**kw):
    return hb.build_model(hb.ModelConfig(**{**TINY, **kw}))


def real_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("kw", [dict(), dict(linear="bitnet"), dict(moe_top_k=1, moe_experts=3),
                                dict(pathway="hc", expansion_rate=4, tie_embeddings=True),
                                dict(n_kv_heads=2, subln=True, moe_capacity_factor=1.0)])
def test_count_params_matches_the_real_count(kw):
    cfg = hb.ModelConfig(**{**TINY, **kw})
    model = hb.build_model(cfg)
    assert real_count(model) == model.num_params() == hb.count_params(cfg)
    # active: the router and top_k of the E experts, per layer
    c = cfg.resolved()
    expert = 3 * c.dim * c.ffn_hidden + (c.ffn_hidden if c.subln else 0)
    per_layer_idle = (c.moe_experts - c.moe_top_k) * expert
    assert hb.count_params(cfg, active=True) == hb.count_params(cfg) - c.n_layers * per_layer_idle
    expert_params = sum(p.numel() for b in model.blocks for n, p in b.ffn.named_parameters()
                        if n != "router.weight")
    assert expert_params == c.n_layers * c.moe_experts * expert


def test_olmoe_preset_counts():
    cfg = preset("olmoe-1b-7b")
    model = hb.build_model(cfg, "meta")
    total, active = hb.count_params(cfg), hb.count_params(cfg, active=True)
    assert model.num_params() == total == 6_919_096_320  # OLMoE-1B-7B: "6.9B total"
    assert active == 1_281_951_744  # "1.3B active"
    block = model.blocks[0].ffn
    assert tuple(block.gate_proj.weight.shape) == (64, 1024, 2048) and block.top_k == 8


def test_init_scales_the_expert_down_projections():
    torch.manual_seed(0)
    cfg = dict(dim=64, ffn_hidden=256, moe_experts=8, n_layers=4)
    for n in (1, 4):
        model = tiny(**cfg, **(dict(pathway="hc", expansion_rate=n) if n > 1 else {}))
        out_std = 0.02 / math.sqrt(2 * 4) / math.sqrt(n)
        for block in model.blocks:
            ffn = block.ffn
            assert isinstance(ffn, MoEFeedForward) and isinstance(ffn.down_proj, ExpertLinear)
            assert ffn.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.03)
            for lin in (ffn.gate_proj, ffn.up_proj, ffn.router):
                assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_training_loss_adds_the_auxiliary_losses_and_eval_is_cross_entropy():
    torch.manual_seed(0)
    model = tiny(moe_balance_coef=0.5, moe_z_coef=0.25)
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))
    logits, loss = model(idx, targets)
    stats = model.moe_stats()
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    layers = [b.ffn.aux for b in model.blocks]
    balance = sum(a["balance"] for a in layers) / 2
    z = sum(a["z"] for a in layers) / 2
    assert stats["moe_balance"].item() == pytest.approx(balance.item()) and balance.item() >= 1.0 - 1e-6
    assert stats["moe_z"].item() == pytest.approx(z.item()) and stats["moe_dropped_frac"].item() == 0.0
    assert loss.item() == pytest.approx((ce + 0.5 * balance + 0.25 * z).item(), rel=1e-6)
    # the balance loss reaches the router through P (f has no gradient)
    loss.backward()
    assert all(b.ffn.router.weight.grad.abs().sum() > 0 for b in model.blocks)
    model.eval()
    logits_eval, loss_eval = model(idx, targets)
    assert torch.equal(logits_eval, logits)
    assert loss_eval.item() == pytest.approx(ce.item(), rel=1e-6)  # comparable with dense models
    dense = hb.build_model(hb.ModelConfig(**{**TINY, "ffn": "swiglu"}))
    assert dense.moe_stats() == {}


def test_tiny_moe_lm_learns():
    torch.manual_seed(0)
    model = tiny()
    # a learnable sequence: each token is the previous one plus 3 (mod 64)
    start = torch.randint(0, 64, (8, 1))
    seq = (start + 3 * torch.arange(25)).remainder(64)
    idx, targets = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router_before = model.blocks[0].ffn.router.weight.detach().clone()
    losses = []
    for _ in range(40):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and sum(losses[-5:]) / 5 < losses[0] - 2.5, losses
    assert not torch.equal(model.blocks[0].ffn.router.weight, router_before)
    assert 1.0 - 1e-6 <= model.moe_stats()["moe_balance"].item() < 1.5  # still spread over experts


PATHWAYS = [dict(pathway="prenorm"), dict(pathway="postnorm"), dict(pathway="hc", expansion_rate=4),
            dict(pathway="hc", expansion_rate=2, hc_dynamic=False),
            dict(pathway="prenorm", linear="bitnet", moe_capacity_factor=1.0)]


@pytest.mark.parametrize("kw", PATHWAYS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_wiring_check_passes_for_moe_models(kw):
    torch.manual_seed(0)
    report = check_wiring(tiny(n_layers=3, **kw))
    assert report.ok, str(report)


@pytest.mark.parametrize("kw", [dict(pathway="prenorm"), dict(pathway="hc", expansion_rate=4)])
def test_wiring_check_catches_x_plus_x_in_a_moe_model(kw):
    torch.manual_seed(0)
    model = tiny(n_layers=3, **kw)

    def forward(self, h, cache=None):
        h = self.attn_path(h, self.attn)
        h = h + h  # the bug: the state is doubled instead of passed on
        return self.ffn_path(h, self.ffn)

    model.blocks[1].forward = types.MethodType(forward, model.blocks[1])
    report = check_wiring(model)
    assert not report.ok and not report.checks["skip path"]
    assert any(p.startswith("block 1:") and "doubles" in p for p in report.problems), str(report)


def test_wiring_check_catches_a_moe_branch_that_adds_its_own_input():
    torch.manual_seed(0)
    model = tiny(n_layers=2)
    ffn = model.blocks[0].ffn
    moe_forward = ffn.forward
    ffn.forward = lambda x: x + moe_forward(x)  # a residual inside the branch: x = x + f(x)
    report = check_wiring(model)
    assert not report.ok and any(p.startswith("block 0:") for p in report.problems), str(report)


@pytest.mark.parametrize("linear", ["fp", "bitnet"])
def test_bf16_autocast_and_bf16_params(linear):
    torch.manual_seed(0)
    model = tiny(linear=linear)
    idx = torch.randint(0, 64, (2, 16))
    _, ref = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    model.to(torch.bfloat16)
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_moe_tiny_run_preset():
    cfg = resolve_run_config("moe-tiny", [])
    assert cfg.model.ffn == "moe" and cfg.model.moe_experts == 8 and cfg.model.moe_top_k == 2
    assert hb.count_params(cfg.model) > hb.count_params(cfg.model, active=True)


def test_train_logs_the_auxiliary_values(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "moe-tiny", "--out", str(run), "train.steps=3", "train.warmup_steps=1", "train.log_every=1",
                 "train.eval_batches=1", "train.batch_size=4", "train.seq_len=32", "data.max_bytes=200000",
                 "model.n_layers=2", "model.moe_capacity_factor=0.5"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["moe_balance"] >= 1.0 - 1e-6 and r["moe_z"] > 0
        # capacity 0.5: at most half of the assignments fit
        assert 0.5 <= r["moe_dropped_frac"] < 1.0
    assert any("val_loss" in r for r in records)

"""The wiring check passes every shipped pathway and flags each planted residual-wiring bug."""

from __future__ import annotations

import types

import pytest
import torch

import hyperbit as hb
from hyperbit.analysis import check_wiring
from hyperbit.pathways import expand_streams, reduce_streams

SHIPPED = [
    dict(pathway="prenorm"),
    dict(pathway="postnorm"),
    dict(pathway="hc", expansion_rate=1, hc_dynamic=False),
    dict(pathway="hc", expansion_rate=2, hc_dynamic=False),
    dict(pathway="hc", expansion_rate=4, hc_dynamic=True),
    dict(pathway="hc", expansion_rate=4, hc_dynamic=True, hc_tanh=False),
    dict(pathway="sequential", expansion_rate=2),
    dict(pathway="parallel", expansion_rate=2),
    dict(pathway="parallel", expansion_rate=3),
    dict(pathway="hc", expansion_rate=4, linear="bitnet"),
    dict(pathway="prenorm", linear="bitnet", ffn="relu2"),
]


def tiny(**kw):
    return hb.build_model(hb.ModelConfig(**{**dict(vocab_size=64, dim=32, n_layers=3, n_heads=4,
                                                    max_seq_len=16), **kw}))


@pytest.mark.parametrize("kw", SHIPPED, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_every_shipped_pathway_passes(kw):
    torch.manual_seed(0)
    report = check_wiring(tiny(**kw))
    assert report.ok, str(report)
    assert set(report.checks) == {"skip path", "chain", "norms", "gradient"}


def test_trained_hc_still_passes():
    """The skip path is the pathways' own (A_r != I after training), not a hard-coded identity."""
    torch.manual_seed(0)
    model = tiny(pathway="hc", expansion_rate=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "static_" in name or "dynamic_" in name:
                p.add_(0.2 * torch.randn_like(p))
    assert check_wiring(model).ok


def _patch(block, forward):
    block.forward = types.MethodType(forward, block)


@pytest.mark.parametrize("pathway", ["prenorm", "hc"])
def test_flags_block_that_doubles_its_state(pathway):
    model = tiny(pathway=pathway, expansion_rate=2 if pathway == "hc" else 1)

    def forward(self, h):
        h = self.attn_path(h, self.attn)
        h = h + h  # the bug: the branch output is doubled and the block's own input lost
        return self.ffn_path(h, self.ffn)

    _patch(model.blocks[1], forward)
    report = check_wiring(model)
    assert not report.ok and not report.checks["skip path"] and not report.checks["chain"]
    assert any(p.startswith("block 1:") and "doubles" in p for p in report.problems), str(report)
    assert not any(p.startswith(("block 0", "block 2")) for p in report.problems), str(report)


def test_flags_the_original_x_plus_x_bug():
    """``x = attn(x); x = x + x``: the branch runs outside its pathway and the input is lost."""
    model = tiny()

    def forward(self, h):
        x = self.attn(self.attn_path.norm(h))
        x = x + x
        return self.ffn_path(x, self.ffn)

    _patch(model.blocks[2], forward)
    report = check_wiring(model)
    assert not report.ok
    assert any(p.startswith("block 2") and "dropped" in p for p in report.problems), str(report)
    assert any("called 0 times" in p for p in report.problems), str(report)


def test_flags_block_that_adds_a_stale_tensor():
    """The wrong 'fix': the skip is captured once and every block adds it instead of its input."""
    model = tiny(pathway="hc", expansion_rate=2)
    stale = {}

    def model_forward(self, idx, targets=None):
        h = expand_streams(self.embed(idx), self.cfg.expansion_rate)
        stale["skip"] = h
        for block in self.blocks:
            h = block(h)
        return self.head(self.final_norm(reduce_streams(h))), None

    def block_forward(self, h):
        h = self.attn_path(h, self.attn)
        return self.ffn_path(h, self.ffn) - h + stale["skip"]  # adds the embedding, not its input

    model.forward = types.MethodType(model_forward, model)
    for block in model.blocks:
        _patch(block, block_forward)
    report = check_wiring(model)
    assert not report.ok and not report.checks["chain"] and not report.checks["gradient"]
    assert any(p.startswith("block 1") and "stale" in p for p in report.problems), str(report)


def test_flags_stale_tensor_inside_a_block():
    model = tiny()

    def forward(self, h):
        self.attn_path(h, self.attn)  # result thrown away
        return self.ffn_path(h, self.ffn)  # stale h

    _patch(model.blocks[0], forward)
    report = check_wiring(model)
    assert not report.checks["chain"]
    assert any(p.startswith("block 0 (ffn_path): its input is not the previous pathway's output")
               for p in report.problems), str(report)


@pytest.mark.parametrize("pathway", ["prenorm", "hc"])
def test_flags_shared_norm(pathway):
    model = tiny(pathway=pathway)
    for block in model.blocks:  # one norm for every layer, as in the original bug
        block.attn_path.norm = block.ffn_path.norm = model.blocks[0].attn_path.norm
    report = check_wiring(model)
    assert not report.checks["norms"]
    assert any("shares its norm module with block 0 (attn_path)" in p for p in report.problems)


def test_flags_shared_norm_weight():
    model = tiny()
    model.blocks[2].ffn_path.norm.weight = model.blocks[1].ffn_path.norm.weight
    report = check_wiring(model)
    assert any("block 2 (ffn_path): shares its norm weight" in p for p in report.problems), str(report)


def test_report_is_readable():
    text = str(check_wiring(tiny()))
    assert text.splitlines()[0] == "wiring check: PASS" and "[ok] chain" in text

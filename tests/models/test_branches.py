"""Branches declare their output projection (hyperbit.nn.branch); init scaling and the wiring
check follow the declaration, not attribute names, so a user's branch with its own names works."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperbit import build_model, convert_to_bitlinear, preset
from hyperbit.analysis import check_wiring
from hyperbit.nn import output_projections


class UserMLP(nn.Module):
    """A user's FFN: no ``down_proj`` anywhere, the output projection is ``fc_out``."""

    output_projection = "fc_out"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))


class TwoExperts(nn.Module):
    """Two output projections, declared as nested paths."""

    output_projection = ("experts.0.out", "experts.1.out")

    def __init__(self, dim: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.ModuleDict({"inp": nn.Linear(dim, 2 * dim, bias=False),
                                                    "out": nn.Linear(2 * dim, dim, bias=False)})
                                     for _ in range(2))

    def forward(self, x):
        return sum(e["out"](F.relu(e["inp"](x))) for e in self.experts) / 2


def _with_user_ffns(dim=256, n_layers=6, n=4, branch=UserMLP):
    torch.manual_seed(0)
    model = build_model(preset("small", dim=dim, n_layers=n_layers, pathway="hc", expansion_rate=n))
    for block in model.blocks:
        block.ffn = branch(dim, 4 * dim) if branch is UserMLP else branch(dim)
    model.reset_parameters()
    return model


def test_init_scales_the_declared_projection_of_a_user_branch():
    model = _with_user_ffns()
    L, n, std = 6, 4, 0.02
    out_std = std / math.sqrt(2 * L) / math.sqrt(n)
    for block in model.blocks:
        assert block.ffn.fc_out.weight.std().item() == pytest.approx(out_std, rel=0.03)
        assert block.ffn.fc_in.weight.std().item() == pytest.approx(std, rel=0.03)
        assert block.attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.03)  # built-in
        assert block.attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.03)


def test_several_declared_projections_by_path():
    model = _with_user_ffns(dim=128, branch=TwoExperts)
    out_std = 0.02 / math.sqrt(12) / 2
    for block in model.blocks:
        for expert in block.ffn.experts:
            assert expert["out"].weight.std().item() == pytest.approx(out_std, rel=0.05)
            assert expert["inp"].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert check_wiring(model).ok


def test_the_declaration_is_resolved_after_a_module_swap():
    model = _with_user_ffns(dim=64)
    convert_to_bitlinear(model)
    (found,) = output_projections(model.blocks[0].ffn)
    assert found is model.blocks[0].ffn.fc_out and type(found).__name__ == "BitLinear"
    assert check_wiring(model).ok


def test_wiring_check_passes_and_catches_a_planted_bug_with_user_branches():
    model = _with_user_ffns(dim=64)
    assert check_wiring(model).ok

    def doubled(self, h):  # the original bug, in a block whose FFN has no down_proj
        h = self.attn_path(h, self.attn)
        h = self.ffn_path(h, self.ffn)
        return h + h

    model.blocks[1].forward = types.MethodType(doubled, model.blocks[1])
    report = check_wiring(model)
    assert not report.ok and not report.checks["skip path"]
    assert any(p.startswith("block 1") and "doubles" in p for p in report.problems), str(report)


def test_a_wrong_declaration_fails_the_skip_path_check():
    """The wiring check zeroes exactly what is declared: naming the query projection instead of
    ``o_proj`` leaves the attention branch live (uniform attention over the values), and the skip
    path check sees it."""
    model = _with_user_ffns(dim=64)
    model.blocks[2].attn.output_projection = "q_proj"
    report = check_wiring(model)
    assert not report.checks["skip path"]
    assert any(p.startswith("block 2") for p in report.problems), str(report)


def test_a_branch_that_declares_nothing_is_one_clear_error():
    model = _with_user_ffns(dim=64)
    bare = nn.Sequential(nn.Linear(64, 64, bias=False))
    model.blocks[0].ffn = bare
    with pytest.raises(ValueError, match="branch Sequential declares no output projection.*output_projection"):
        model.reset_parameters()
    with pytest.raises(ValueError, match="declares no output projection"):
        check_wiring(model)
    bare.output_projection = "0"  # a user can declare it on an instance too
    model.reset_parameters()
    assert check_wiring(model).ok
    bare.output_projection = "fc_out"
    with pytest.raises(ValueError, match="declares output projection 'fc_out', which is not one of its"):
        model.reset_parameters()

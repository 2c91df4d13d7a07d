"""Schedules: exact values at the landmarks, and the two-stage BitNet recipe's drop and WD switch."""

from __future__ import annotations

import math

import pytest
import torch

import hyperbit as hb
from hyperbit.train.schedule import Schedule, apply_schedule


def test_cosine_landmarks():
    s = Schedule("cosine", lr=1e-3, max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(10) == pytest.approx(1e-3)  # cosine starts at the peak
    assert s.lr_at(55) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the mean
    assert s.lr_at(100) == pytest.approx(1e-4) and s.lr_at(500) == pytest.approx(1e-4)
    lrs = [s.lr_at(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warmup


def test_two_stage_drops_sharply_and_turns_weight_decay_off():
    s = Schedule("two_stage", lr=1e-3, max_steps=100, warmup_steps=10, min_lr_ratio=0.05,
                 split=0.5, stage1_end_ratio=0.5, cooldown_ratio=0.2, weight_decay=0.1)
    assert s.split_step == 50
    assert s.lr_at(49) == pytest.approx(1e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 39 / 40))))
    assert s.lr_at(50) == pytest.approx(2e-4)  # the sharp cool-down
    assert s.lr_at(49) / s.lr_at(50) > 2.4
    assert s.lr_at(100) == pytest.approx(5e-5)
    assert s.weight_decay_at(49) == 0.1 and s.weight_decay_at(50) == 0.0


def test_apply_schedule_sets_groups_and_keeps_no_decay_group_at_zero():
    model = hb.build_model(hb.preset("tiny", pathway="hc", expansion_rate=2))
    opt = hb.make_optimizer(model, lr=1.0, weight_decay=0.1)
    s = Schedule("two_stage", lr=1e-3, max_steps=10, warmup_steps=2, weight_decay=0.1)
    apply_schedule(opt, s, 3)
    decayed, kept = opt.param_groups
    assert decayed["lr"] == kept["lr"] == pytest.approx(s.lr_at(3))
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    apply_schedule(opt, s, 7)  # stage 2: decay off
    assert decayed["weight_decay"] == 0.0 and kept["weight_decay"] == 0.0
    apply_schedule(opt, Schedule("cosine", lr=1e-3, max_steps=10, warmup_steps=2), 3)
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0  # back on, still only one
    assert torch.is_tensor(decayed["params"][0])


@pytest.mark.parametrize("kw,needle", [(dict(kind="linear"), "choose one of"),
                                      (dict(warmup_steps=20, max_steps=10), "warmup_steps"),
                                      (dict(kind="two_stage", split=1.0), "split")])
def test_bad_schedule_is_rejected(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Schedule(**kw)

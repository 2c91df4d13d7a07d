"""Learning-rate and weight-decay schedules, as pure functions of the step (resume-safe).

``cosine``: linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.

``two_stage`` (the BitNet b1.58 recipe, spec ``bitnet.md`` section 3): stage 1 (steps before
``split * max_steps``) warms up, then decays by cosine from ``lr`` to ``lr * stage1_end_ratio``
with weight decay on; at the split the learning rate drops sharply to ``lr * cooldown_ratio`` and
decays by cosine to ``lr * min_lr_ratio``, with weight decay off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "two_stage", "constant")


@dataclass(frozen=True)
class Schedule:
    kind: str = "cosine"
    lr: float = 3e-3
    max_steps: int = 1000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    split: float = 0.5  # two_stage: fraction of max_steps in stage 1
    stage1_end_ratio: float = 0.5  # two_stage: lr at the end of stage 1, relative to lr
    cooldown_ratio: float = 0.2  # two_stage: lr at the start of stage 2, relative to lr

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule={self.kind!r} is not allowed; choose one of {list(SCHEDULES)}")
        if self.max_steps < 1 or not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= max_steps ({self.max_steps})")
        if not 0.0 < self.split < 1.0:
            raise ValueError(f"split must be in (0, 1), got {self.split}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            return self.lr * _cosine(step, self.warmup_steps, self.max_steps, 1.0, self.min_lr_ratio)
        boundary = self.split_step
        if step < boundary:
            return self.lr * _cosine(step, self.warmup_steps, boundary, 1.0, self.stage1_end_ratio)
        return self.lr * _cosine(step, boundary, self.max_steps, self.cooldown_ratio, self.min_lr_ratio)

    def weight_decay_at(self, step: int) -> float:
        """Weight decay for the decayed parameter group (off in the second BitNet stage)."""
        if self.kind == "two_stage" and step >= self.split_step:
            return 0.0
        return self.weight_decay

    @property
    def split_step(self) -> int:
        return max(self.warmup_steps, int(self.split * self.max_steps))


def _cosine(step: int, start: int, end: int, high: float, low: float) -> float:
    """Cosine from ``high`` at ``start`` to ``low`` at ``end`` (clamped after ``end``)."""
    progress = min(1.0, max(0.0, (step - start) / max(1, end - start)))
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_schedule(optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr, and the weight decay of the group named ``"decay"`` (see
    :func:`hyperbit.train.optim.param_groups`), for ``step``; returns the lr."""
    lr, wd = schedule.lr_at(step), schedule.weight_decay_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") == "decay":
            group["weight_decay"] = wd
    return lr

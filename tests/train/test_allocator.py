"""The CPU allocator's settings for training (``hyperbit/train/allocator.py``): with them, a
step's worth of freed tensors is reused instead of faulted in again from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hyperbit.train import allocator

# Allocate (and touch) what a small training step does, 16 tensors of 4 MiB, and free them
# together; then count the minor page faults of ten more such steps.
_STEPS = """
import resource, sys, torch
from hyperbit.train.allocator import keep_freed_memory
print(keep_freed_memory())
def step():
    ts = [torch.ones(2**20) for _ in range(16)]
    del ts
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(tuning: str) -> tuple[bool, float]:
    env = {**os.environ, allocator.ENV: tuning}
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(allocator._glibc() is None, reason="not glibc: the allocator is left as it is")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    applied, tuned = _faults_per_step("1")
    off, untuned = _faults_per_step("0")
    assert applied and not off
    print(f"minor faults per step: {untuned:.0f} as glibc is, {tuned:.0f} with freed memory kept")
    if untuned < 1000:
        pytest.skip(f"this glibc faults only {untuned:.0f} pages a step without the settings")
    assert tuned < 0.25 * untuned, (tuned, untuned)


class _Libc:
    """Records mallopt calls (a plain function: the module sets a ctypes function's argtypes)."""

    def __init__(self):
        self.calls = []

        def mallopt(param, value):
            self.calls.append((param, value))
            return 1

        self.mallopt = mallopt


def test_the_settings_and_the_switch(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.keep_freed_memory()
    assert libc.calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc.calls.clear()
    monkeypatch.setenv(allocator.ENV, "0")
    assert not allocator.keep_freed_memory() and libc.calls == []
    monkeypatch.setattr(allocator, "_glibc", lambda: None)  # another C library, or not Linux
    monkeypatch.delenv(allocator.ENV)
    assert not allocator.keep_freed_memory()

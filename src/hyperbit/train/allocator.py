"""The C allocator's settings for a training process on the CPU.

A training step on the CPU allocates and frees the same tensors every step: activations, their
gradients and the kernels' outputs, many of them megabytes. glibc's ``malloc`` serves the large
ones with fresh ``mmap`` pages and trims freed memory at the top of its heap back to the kernel,
so each step faults in and zeroes tens of thousands of pages again: measured 10k-30k minor
faults and 20-70 ms of system time per step on the default benchmark model (d 256 x 6 blocks,
batch 8 x seq 256; mHC x4 the most), against about 2 ms with the settings below
(``docs/benchmarks.md``, "Page faults").

:func:`keep_freed_memory` serves blocks up to 32 MiB (glibc's largest mmap threshold) from the
heap and keeps up to 1 GiB of freed memory in the process, so the next step reuses the same
pages. The process's resident memory then stays at its peak instead of shrinking between steps;
the peak itself does not change. ``hyperbit train`` applies it on the CPU;
``HYPERBIT_MALLOC_TUNING=0`` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap (glibc's HEAP_MAX_SIZE / 2 on 64-bit: its maximum)
MMAP_THRESHOLD = 32 << 20
#: freed memory kept at the top of the heap before any is given back
TRIM_THRESHOLD = 1 << 30

ENV = "HYPERBIT_MALLOC_TUNING"


def _glibc():
    """The C library if it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring) for this process; returns whether
    they were set: False off Linux, with another C library, or with ``HYPERBIT_MALLOC_TUNING=0``."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))

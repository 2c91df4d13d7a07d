"""Which floating-point precision a run computes in: bf16 where the device computes it natively,
fp32 elsewhere.

``precision = "auto"`` (the default) resolves per device: bf16 autocast on CUDA devices that
support bf16 and on CPUs with ``avx512_bf16`` or ``amx_bf16``; fp32 everywhere else. On a CPU
without them every bf16 matrix product is emulated, several times slower than fp32, so bf16 there
is only used when asked for. ``fp16`` is autocast to float16 with a gradient scaler (the loss is
scaled so that small gradients do not flush to zero). Parameters and optimizer state stay fp32
in every mode; autocast casts the inputs of the matrix products.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` or ``"fp32"`` for ``device``; any other value as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; choose one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def describe(precision: str, device: torch.device | str) -> str:
    """One line for the start-up log: what ``precision`` resolves to on ``device``, and why."""
    resolved = resolve_precision(precision, device)
    kind = torch.device(device).type
    if precision != "auto":
        note = ""
        if resolved == "bf16" and not native_bf16(device):
            note = f" (this {kind.upper()} emulates bf16: expect it to be several times slower than fp32)"
        return f"precision: {resolved}{note}"
    why = "computes bf16 natively" if resolved == "bf16" else "has no native bf16"
    return f"precision: {resolved} (auto: this {kind.upper()} {why})"


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "auto":
        raise ValueError("resolve the precision for the device first (resolve_precision)")
    dtype = _DTYPES.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A gradient scaler that is active for fp16 and a pass-through otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

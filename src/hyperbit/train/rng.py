"""Every random number generator a training step draws from, as JSON-able state: Python, numpy
(when imported), torch on the CPU and every CUDA device. Checkpoints store it so that a resumed run
draws exactly what the uninterrupted run would have."""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any

import torch

from .errors import CheckpointError, first_line


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (if imported), torch CPU and every CUDA device's RNG state, as JSON-able lists."""
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {"python": [version, list(internal), gauss],
                           "torch": torch.get_rng_state().tolist()}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        rng["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states recorded by save_checkpoint. Accepts state.json's dict or the whole
    dict load_checkpoint returns. CUDA states are skipped (with a warning) without CUDA."""
    if "rng" not in state and isinstance(state.get("state"), dict):
        state = state["state"]
    rng = state.get("rng")
    if not isinstance(rng, dict):
        raise CheckpointError("state has no 'rng' entry to restore")
    try:
        if "python" in rng:
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if "torch" in rng:
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "numpy" in rng:
            import numpy as np
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in rng:
            saved = [torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]]
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if available != len(saved):
                warnings.warn(f"checkpoint has CUDA RNG states for {len(saved)} device(s), "
                              f"{available} available; restoring {min(available, len(saved))}",
                              stacklevel=2)
            for i in range(min(available, len(saved))):
                torch.cuda.set_rng_state(saved[i], i)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt RNG state in checkpoint: {first_line(e)}") from None

"""Training utilities: crash-safe checkpoints (safetensors + JSON, no pickles) and schedules."""

from .checkpoint import (CheckpointError, capture_rng_state, latest_checkpoint, load_checkpoint,
                         resolve_checkpoint, restore_rng_state, save_checkpoint)
from .schedule import Schedule, apply_schedule

__all__ = ["CheckpointError", "Schedule", "apply_schedule", "capture_rng_state",
           "latest_checkpoint", "load_checkpoint", "resolve_checkpoint", "restore_rng_state",
           "save_checkpoint"]

"""Training: run configs, schedules, crash-safe checkpoints (safetensors + JSON, no pickles) and
the resumable loop (:mod:`hyperbit.train.loop`)."""

from .checkpoint import (CheckpointError, capture_rng_state, latest_checkpoint, load_checkpoint,
                         resolve_checkpoint, restore_rng_state, save_checkpoint)
from .config import RUN_PRESETS, DataConfig, RunConfig, TrainConfig, resolve_run_config
from .schedule import Schedule, apply_schedule

__all__ = ["CheckpointError", "DataConfig", "RUN_PRESETS", "RunConfig", "Schedule", "TrainConfig",
           "resolve_run_config", "apply_schedule", "capture_rng_state",
           "latest_checkpoint", "load_checkpoint", "resolve_checkpoint", "restore_rng_state",
           "save_checkpoint"]

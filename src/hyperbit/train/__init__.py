"""Training: run configs, the resumable loop, optimizer groups, schedules, crash-safe checkpoints
(safetensors + JSON, no pickles) and data-parallel runs."""

from .checkpoint import (latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint,
                         step_of)
from .config import RUN_PRESETS, RunConfig, TrainConfig, resolve_run_config
from .errors import CheckpointError, TrainingStopped
from .evaluate import evaluate
from .loop import train
from .optim import make_optimizer, param_groups
from .rng import capture_rng_state, restore_rng_state
from .schedule import Schedule, apply_schedule

__all__ = ["CheckpointError", "RUN_PRESETS", "RunConfig", "Schedule", "TrainConfig",
           "TrainingStopped", "apply_schedule", "capture_rng_state", "evaluate",
           "latest_checkpoint", "load_checkpoint", "make_optimizer", "param_groups",
           "resolve_checkpoint", "resolve_run_config", "restore_rng_state", "save_checkpoint",
           "step_of", "train"]

"""Errors of the training layer; each message is one line a user can act on."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model. One-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # guarantee a single line


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss); the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; ``checkpoint`` is where it was saved (None when it
    stopped before its first step). The command line exits with ``128 + signum``."""

    def __init__(self, signum: int, checkpoint=None, step: int | None = None):
        super().__init__(signum)
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]

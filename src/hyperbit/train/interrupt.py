"""Ctrl-C and SIGTERM while training: finish the step, save a checkpoint, stop.

While :class:`StopRequests` is installed, SIGINT and SIGTERM do not kill the process. Before the
first step they raise :class:`~hyperbit.train.errors.TrainingInterrupted` at once (there is
nothing to save); once the loop has started (:meth:`StopRequests.arm`) they only set a flag, which
the loop reads at the end of every step: it writes a checkpoint and raises ``TrainingInterrupted``.
A second signal while the first is being handled stops at once. The command line exits with
``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a killed process.
"""

from __future__ import annotations

import signal
import threading

from .errors import TrainingInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A context manager that owns SIGINT/SIGTERM for its duration (main thread only; elsewhere,
    e.g. in a worker thread, it does nothing and signals keep their usual effect)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on a signal asks the loop to stop after the current step."""
        self.armed = True

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if not self.armed or self.signum is not None:
            raise TrainingInterrupted(signum)
        self.signum = signum

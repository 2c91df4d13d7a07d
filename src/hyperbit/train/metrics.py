"""What a run reports while it trains: the progress line, ``metrics.jsonl`` and (when installed)
TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from .._io import atomic_write_text


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, tokens_per_step: int, log: Callable[[str], None],
                 enabled: bool = True):
        self.total, self.start, self.tokens_per_step, self.log = total, start, tokens_per_step, log
        self.t0 = time.perf_counter()
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.last_print = 0.0

    def rates(self, done: int) -> dict:
        elapsed = time.perf_counter() - self.t0
        steps = max(done - self.start, 1)
        return {"tok_s": steps * self.tokens_per_step / max(elapsed, 1e-9), "elapsed_s": elapsed}

    def update(self, done: int, loss: float | None) -> None:
        """``loss``: the last logged loss (None before the first log step): the bar never makes
        the host wait for the device."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and done % max(1, self.total // 20) and done != self.total:
            return
        if self.tty and now - self.last_print < 0.2 and done != self.total:
            return
        self.last_print = now
        r = self.rates(done)
        eta = (self.total - done) * r["elapsed_s"] / max(done - self.start, 1)
        width = 24
        filled = int(width * done / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  loss "
                f"{'-' if loss is None else format(loss, '.4f')}  "
                f"{r['tok_s']:,.0f} tok/s  ETA {eta:4.0f}s")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            self.log(line)

    def note(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\n")
        self.log(text)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def write_metrics(f, record: dict, board=None) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    if board is not None:
        for key, value in record.items():
            if key == "monitor":  # per-depth lists: the deepest value of each (None: undefined)
                for name, values in value.items():
                    if values is not None and values[-1] is not None:
                        board.add_scalar(f"monitor/{name}_last", values[-1], record["step"])
            elif key != "step":
                board.add_scalar(key, value, record["step"])


def open_tensorboard(out: Path):
    """A TensorBoard writer in ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl is always written
        return None
    return SummaryWriter(str(out / "tensorboard"))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))

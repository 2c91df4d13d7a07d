"""Plotting support shared by ``hyperbit compare`` and ``hyperbit inspect``: matplotlib on the
non-interactive Agg backend (no display needed), imported only when a plot is drawn, and the
x axes that matplotlib gets wrong for a single x value."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import ConfigError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a one-line ConfigError when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def progress_axis(ax, values) -> None:
    """An x axis of steps or tokens: integer ticks, and when every value is the same (one logged
    step, one monitor record) the range 0 .. that value, a point partway through training,
    instead of matplotlib's +-5% around it (28.5 .. 31.5 for step 30)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = {float(v) for v in values if v is not None and math.isfinite(float(v))}
    if len(finite) == 1:
        (x,) = finite
        ax.set_xlim(*((0.0, 1.05 * x) if x > 0 else (x - 1.0, x + 1.0)))


def position_axis(ax, count: int, first: int = 1) -> None:
    """An x axis of ``count`` positions ``first, first + 1, ...`` (depths, blocks, arms): half a
    position either side, so a single one sits in the middle of a sensible axis."""
    ax.set_xlim(first - 0.5, first + count - 0.5)


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG next to its final name, then move it into place, and close it."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    pyplot().close(fig)
    return path

"""Plotting support shared by ``hyperbit compare`` and ``hyperbit inspect``: matplotlib on the
non-interactive Agg backend (no display needed), imported only when a plot is drawn."""

from __future__ import annotations

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

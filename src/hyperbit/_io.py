"""Files that are never seen half-written: atomic replacement, exclusive creation with fsync,
directory fsync and content hashing. Checkpoints, metrics, reports and plots all write through
these."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, then rename it into place: a reader (or
    a kill mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_and_sync(path: Path) -> dict[str, Any]:
    """Size and sha256 of what is on disk, and make sure it is durable."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable; a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

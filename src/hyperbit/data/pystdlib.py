"""The embedded default corpus: ``.py`` files of the interpreter's standard library.

Order and split never depend on the file system: files are sorted by their path relative to the
standard-library root (POSIX form), and a file belongs to the validation split when the CRC-32 of
that relative path is divisible by 50 (about 2% of files). Test suites (``test/``, ``idlelib/
idle_test/``), ``site-packages`` and ``lib2to3`` test data are excluded.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

_EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
VAL_MODULUS = 50


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def pystdlib_files(split: str = "train") -> list[Path]:
    """Sorted list of the files of one split (``"train"`` or ``"val"``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not allowed; choose one of ['train', 'val']")
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDE_DIRS.intersection(rel.parts[:-1]):
            continue
        is_val = zlib.crc32(rel.as_posix().encode()) % VAL_MODULUS == 0
        if is_val == (split == "val"):
            files.append(rel)
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def load_pystdlib(split: str = "train", max_bytes: int | None = None) -> torch.Tensor:
    """The split as one uint8 tensor of bytes (files joined by a blank line), optionally capped."""
    chunks, total = [], 0
    for path in pystdlib_files(split):
        data = path.read_bytes() + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

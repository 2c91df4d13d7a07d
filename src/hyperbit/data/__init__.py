"""Corpora. ``pystdlib``: the Python standard library sources of the running interpreter, a real
text corpus that exists on every machine the package runs on."""

from .pystdlib import load_pystdlib, pystdlib_files

__all__ = ["load_pystdlib", "pystdlib_files"]

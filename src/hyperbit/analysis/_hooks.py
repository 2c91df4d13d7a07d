"""Module hooks for the analyses that record a forward pass."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def recording(modules: Iterable[nn.Module], hook: Callable, pre: bool = False) -> Iterator[None]:
    """``hook`` as a forward hook (``pre``: a forward pre-hook) of every module of ``modules`` while
    the block runs. Compiled blocks run eagerly meanwhile: dynamo does not guard on module hooks, so
    a graph compiled before the hooks existed would skip them, and recompiling for a diagnostic
    pass would cost more than it saves."""
    handles = [m.register_forward_pre_hook(hook) if pre else m.register_forward_hook(hook) for m in modules]
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for h in handles:
            h.remove()

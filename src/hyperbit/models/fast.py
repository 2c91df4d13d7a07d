"""Fast paths for a built model: regional ``torch.compile`` and activation checkpointing.

Both act on a built :class:`~hyperbit.models.TransformerLM` in place, per block, and leave the
eager model as the reference (the tests check forward and every parameter's gradient against it):

* :func:`compile_blocks` compiles each block on its own (``block.compile()``): compile time is
  that of one block (identical blocks reuse its code), ``state_dict`` keys do not change, and
  FSDP2 can still shard per block after compiling. Inside a compiled block hyper-connections keep
  the memory-lean autograd nodes of ``pathways._hc_fused`` (traced into the block's graph), and on
  CPU their C kernels run as ``torch.library`` operators (``nn/native_ops.py``) among the code
  Inductor generates for the rest of the block. Measured on CPU (``docs/benchmarks.md``,
  ``train_throughput.py --models``) they compile to a faster step and fewer saved bytes than
  plain autograd left to Inductor. ``fused_hc=False`` selects plain autograd
  (``HyperConnection.fused = False`` per module).
* :func:`set_activation_checkpointing` recomputes each block's forward in backward
  (``torch.utils.checkpoint``, ``use_reentrant=False``): identical loss and gradients, a block's
  activations freed after its forward (only each block's input stays saved).

Order, as torchtitan does: convert linear layers (BitLinear) first, then checkpointing, then
:func:`compile_blocks`, then shard.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..pathways import FracConnection, HyperConnection, ManifoldHyperConnection
from .lm import Block, TransformerLM


def _blocks(model: nn.Module) -> list[Block]:
    if isinstance(model, TransformerLM):
        return list(model.blocks)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"expected a TransformerLM or a module holding Blocks, got {type(model).__name__}")
    return blocks


def compile_blocks(model: nn.Module, *, fused_hc: bool = True, **compile_kwargs: Any) -> nn.Module:
    """Compile every block of ``model`` on its own, in place; returns ``model``.

    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ...).
    ``fused_hc``: hyper-connections inside the blocks use the custom autograd nodes (True, the
    default: see the module docstring) or plain autograd (False).
    Embedding, final norm, head and loss stay eager (one large GEMM and a cross-entropy: nothing
    for the compiler to fuse). Calling it again recompiles nothing already compiled.
    """
    for block in _blocks(model):
        for m in block.modules():
            if isinstance(m, (HyperConnection, ManifoldHyperConnection, FracConnection)):
                m.fused = fused_hc  # an instance attribute: the class default stays the eager path
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(**compile_kwargs)
    return model


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn per-block activation checkpointing on (or off) in place; returns ``model``.

    With it on, a block keeps only its input for backward and recomputes its forward there
    (``torch.utils.checkpoint``, ``use_reentrant=False``, RNG state preserved): loss and gradients
    are those of the plain model. The block's ``forward`` is replaced on the instance (no wrapper
    module: ``state_dict`` keys do not change), so it works with :func:`compile_blocks` in either
    order; compiled, the checkpoint is part of the block's graph and Inductor recomputes it.
    Decoding with a KV cache, or with gradients off, is never checkpointed.
    """
    for block in _blocks(model):
        if enabled:
            block.forward = types.MethodType(_checkpointed_forward, block)
        elif "forward" in vars(block):
            del block.forward  # back to the class's forward
        # A checkpointed block keeps only its input, so a hyper-connection's streams need not be
        # rebuilt from what the previous one keeps; and inside torch.compile the offer (an
        # attribute set on a tensor) is a side effect a checkpointed region may not have.
        block.attn_path.feeds_next = not enabled
    return model


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether :func:`set_activation_checkpointing` is on for every block of ``model``."""
    return all(vars(b).get("forward") is not None for b in _blocks(model))


def _checkpointed_forward(block: Block, h: Tensor, cache: Any = None) -> Tensor:
    forward = type(block).forward
    if cache is not None or not torch.is_grad_enabled():
        return forward(block, h, cache)
    return checkpoint(forward, block, h, use_reentrant=False)

"""The linear-layer factory the model builds every projection with (``fp`` or ``bitnet``), and
:func:`fused_linear`: several projections of one input computed with one matmul."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .bitlinear import BitLinear, cat_weights


def make_linear(kind: str, in_features: int, out_features: int) -> nn.Linear:
    if kind == "fp":
        return nn.Linear(in_features, out_features, bias=False)
    if kind == "bitnet":
        return BitLinear(in_features, out_features)
    raise ValueError(f"linear={kind!r} is not allowed; choose one of ['fp', 'bitnet']")


def fused_linear(layers: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """``[layer(x) for layer in layers]`` with one matmul where the layer type allows it.

    The modules stay separate (one weight per original projection, the checkpoint layout
    unchanged); only the computation is fused:

    * layers of one type that has a ``fused_forward(layers, x)`` class- or staticmethod
      (:class:`~hyperbit.nn.BitLinear`, ``PackedBitLinear``): that method;
    * bias-free ``nn.Linear``: the weights concatenated, one ``F.linear``, the output split;
    * anything else, or a layer with forward hooks (which a fused call would skip): separate calls.
    """
    kind = type(layers[0])
    if any(type(m) is not kind or m._forward_hooks or m._forward_pre_hooks for m in layers):
        return [m(x) for m in layers]
    fused = getattr(kind, "fused_forward", None)
    if fused is not None:
        return list(fused(list(layers), x))
    if kind is nn.Linear and all(m.bias is None for m in layers):
        w = cat_weights([m.weight for m in layers])  # (sum of out_features, in_features)
        return list(F.linear(x, w).split([m.out_features for m in layers], dim=-1))
    return [m(x) for m in layers]

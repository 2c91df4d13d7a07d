"""The linear-layer factory the model builds every projection with (``fp`` or ``bitnet``)."""

from __future__ import annotations

from torch import nn

from .bitlinear import BitLinear


def make_linear(kind: str, in_features: int, out_features: int) -> nn.Linear:
    if kind == "fp":
        return nn.Linear(in_features, out_features, bias=False)
    if kind == "bitnet":
        return BitLinear(in_features, out_features)
    raise ValueError(f"linear={kind!r} is not allowed; choose one of ['fp', 'bitnet']")

"""BitLinear b1.58: ternary absmean weights, 8-bit absmax per-token activations, straight-through.

Forward (spec ``bitnet.md`` section 1)::

    gamma = max(mean(|W|), eps)            W_q = clamp(round(W / gamma), -1, 1) * gamma
    s     = 127 / max(|x|, eps) per token  x_q = clamp(round(x * s), -128, 127) / s
    y     = x_q @ W_q^T

The weight scale is clamped, not shifted: the same ``gamma`` divides and multiplies, so
``W_q / gamma`` is exactly ternary and the codes are ``clamp(round(W / gamma), -1, 1)`` with the
zero band exactly ``|w| < gamma / 2`` (the form of the published BitNet training code; the
``W / (gamma + eps)`` form of the paper quantises with one scale and dequantises with another).
An all-zero weight gets ``gamma = eps`` and codes 0 (no division by zero); a weight whose
``mean(|W|)`` is below ``eps`` is quantised on the ``eps`` grid.

All scale arithmetic is fp32, whatever the autocast dtype. The backward is the straight-through
estimator: quantisation is treated as the identity, so the gradients equal those of a plain linear
evaluated at the quantised tensors, and the latent weights stay full precision. Each ``BitLinear``
is one original projection, so each has exactly one weight scale; :meth:`BitLinear.fused_forward`
runs several projections of one input as one matmul and keeps those scales.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5


def weight_scale(w: Tensor) -> Tensor:
    """gamma = max(mean(|W|), eps), in fp32."""
    return w.detach().float().abs().mean().clamp(min=EPS)


@torch.no_grad()
def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Ternary codes in {-1, 0, 1} (fp32) and the fp32 scale gamma; ``codes * gamma`` is W_q."""
    gamma = weight_scale(w)
    codes = (w.float() / gamma).round_().clamp_(-1, 1)
    return codes, gamma


@torch.no_grad()
def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """Integer codes in [-128, 127] (fp32) and the per-token fp32 scale ``s`` (shape ``(..., 1)``)."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)
    return (xf * s).round_().clamp_(-128, 127), s


def cat_weights(weights: list[Tensor]) -> Tensor:
    """``torch.cat(weights)`` along the output rows, outside autocast (on CPU its policy for cat
    refuses fp16 tensors under bf16 autocast and the reverse): the weights keep their dtype and
    the matmul that reads them is cast as usual."""
    device = weights[0].device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return torch.cat(weights)
    return torch.cat(weights)


class _STE(torch.autograd.Function):
    """Returns ``quantised`` in the forward and passes the gradient straight to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, quantised: Tensor) -> Tensor:
        return quantised

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def ste_weight(w: Tensor) -> Tensor:
    codes, gamma = quantize_weight(w)
    return _STE.apply(w, (codes * gamma).to(w.dtype))


def ste_activation(x: Tensor) -> Tensor:
    codes, s = quantize_activation(x)
    return _STE.apply(x, (codes / s).to(x.dtype))


class BitLinear(nn.Linear):
    """Drop-in ``nn.Linear`` (no bias) whose forward uses W1.58 A8 quantisation.

    ``quant_strength`` (lambda in [0, 1]) blends in the quantisation for converting a pretrained
    full-precision model: ``w + lambda * (quant(w) - w)``; 1.0 (default) is plain BitNet b1.58.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device=None, dtype=None):
        if bias:
            raise ValueError("BitLinear has no bias (BitNet b1.58 uses none)")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.quant_strength = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BitLinear":
        """Wrap an existing ``nn.Linear``, sharing (not copying) its weight."""
        if linear.bias is not None:
            raise ValueError("cannot convert a Linear with a bias to BitLinear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", None)
        new.quant_strength = 1.0
        return new

    def forward(self, x: Tensor) -> Tensor:
        w, lam = self.weight, self.quant_strength
        if lam >= 1.0:
            return F.linear(ste_activation(x), ste_weight(w))
        xq, wq = ste_activation(x), ste_weight(w)
        return F.linear(x + lam * (xq - x), w + lam * (wq - w))

    @classmethod
    def fused_forward(cls, layers: list["BitLinear"], x: Tensor) -> list[Tensor]:
        """``[layer(x) for layer in layers]`` as one matmul: every weight ternarised with its own
        scale (one gamma per original projection), the ternary weights concatenated, ``x``
        quantised once. Equal to separate calls up to the summation order of the matmul."""
        lam = layers[0].quant_strength
        if any(m.quant_strength != lam for m in layers):  # different blends: no shared input
            return [m(x) for m in layers]
        wq = cat_weights([ste_weight(m.weight) for m in layers])  # (sum of out_features, in_features)
        xq = ste_activation(x)
        if lam >= 1.0:
            y = F.linear(xq, wq)
        else:
            w = cat_weights([m.weight for m in layers])
            y = F.linear(x + lam * (xq - x), w + lam * (wq - w))
        return list(y.split([m.out_features for m in layers], dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w1.58a8"


def default_filter(name: str, module: nn.Module) -> bool:
    """Convert every bias-free ``nn.Linear`` except the LM head (embeddings are not Linear)."""
    return name.split(".")[-1] not in ("head", "lm_head")


def convert_to_bitlinear(model: nn.Module,
                         filter_fn: Callable[[str, nn.Module], bool] = default_filter) -> nn.Module:
    """Swap ``nn.Linear`` modules for :class:`BitLinear` in place, keeping their weights.

    ``filter_fn(qualified_name, module)`` decides which linears convert; the default skips the LM
    head. Embeddings, norms and hyper-connection parameters are never touched. Returns ``model``.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and child.bias is None and filter_fn(full, child):
                setattr(module, child_name, BitLinear.from_linear(child))
    return model

"""RMSNorm with a hand-written backward that saves only the input and one scalar per row.

``F.rms_norm`` on CPU is a composite of elementwise ops whose autograd keeps two full-size
tensors for backward; in a small transformer the norms are a large share of activation memory, so
this halves it, and it makes fewer passes over the data (faster forward + backward on CPU in fp32
and bf16 than ``F.rms_norm`` and than a plain fp32 composite under autograd).
Statistics are computed in fp32 (fp64 for fp64 inputs) whatever the input dtype (the residual
stream is fp32; under autocast nothing here is downcast); the output has the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_rstd(x: Tensor, eps: float) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dim, without a full-size temporary. Every RMS norm
    in the package (modules and fused hyper-connection kernels) uses this one formula, so their
    results agree bit for bit."""
    return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1] + eps)


def rms_backward(grad_xhat: Tensor, xhat: Tensor, rstd: Tensor) -> Tensor:
    """d/dx of ``xhat = x * rstd(x)`` given dL/dxhat: ``rstd * (g - xhat * mean(g * xhat))``."""
    m = (grad_xhat * xhat).mean(-1, keepdim=True)  # (..., 1)
    return torch.addcmul(grad_xhat, xhat, m, value=-1).mul_(rstd)


class _RMSNormFn(torch.autograd.Function):
    """``y = x * r * w`` with ``r = rms_rstd(x)``; the backward is :func:`rms_backward` on
    ``(g * w, x * r, r)``, the same arithmetic as the fused hyper-connection kernels (a
    one-stream hyper-connection equals Pre-Norm in gradients too), with one full-size temporary
    fewer per step than the textbook form and ``dw`` computed in place of ``x * r``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        rstd = rms_rstd(xf, eps)  # (..., 1)
        y = xf * rstd
        if weight is not None:
            y = y.mul_(weight.to(compute))
        ctx.save_for_backward(x, weight, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        g = grad.to(rstd.dtype)
        xhat = x.to(rstd.dtype) * rstd  # (..., d)
        gw = g * weight.to(rstd.dtype) if weight is not None else g
        dx = rms_backward(gw, xhat, rstd).to(x.dtype) if ctx.needs_input_grad[0] else None
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = xhat.mul_(g).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # sum of g * xhat
        return dx, dweight, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return _RMSNormFn.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; ``affine=False`` gives the parameter-free norm used by dynamic HC."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"

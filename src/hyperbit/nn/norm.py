"""RMSNorm with a hand-written backward that saves only the input and one scalar per row.

``F.rms_norm`` keeps two full-size tensors for backward; in a small transformer the norms are a
large share of activation memory, so this halves it. Statistics are computed in fp32 (fp64 for fp64 inputs)
whatever the input dtype (the residual stream is fp32; under autocast nothing here is downcast).
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
    return rstd * (grad_xhat - xhat * (grad_xhat * xhat).mean(-1, keepdim=True))


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = rms_rstd(xf, eps)  # (..., 1)
        y = xf * rstd
        if weight is not None:
            y = y * weight.to(xf.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        g = grad.to(rstd.dtype)
        xhat = x.to(rstd.dtype) * rstd
        gw = g * weight.to(rstd.dtype) if weight is not None else g
        dx = rms_backward(gw, xhat, rstd)
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (g * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dweight, None


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

"""Memory-lean width connection: one autograd node that saves only the streams.

A naive hyper-connection keeps, per branch, the streams ``H`` (n x d), their norm (n x d) and the
whole ``alpha^T H`` product ((n+1) x d) alive for backward: ~3x the activation memory of Pre-Norm
at n = 4. This node saves ``H`` once (in the autocast dtype when autocast is on, like every linear
layer saves its input) plus per-token scalars, and recomputes the rest in backward. The forward is
computed in fp32 exactly as :meth:`HyperConnection.width_connection_reference`; tests check values
and every gradient against that reference.

Inputs: H (B, T, n, d) fp32; static alpha (n, n+1), beta (n,); optional dynamic W (d, n+2)
(``[W_alpha | W_beta]``), gains s_alpha, s_beta (1,); optional branch-norm weight (d,).
Outputs: the normed branch input (B, T, d), the mixed streams H' = A_r^T H (B, T, n, d) and beta
((n,) static or (B, T, n) dynamic).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rms(x: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rms_backward(grad_xhat: Tensor, xhat: Tensor, rstd: Tensor) -> Tensor:
    """d/dx of xhat = x * rstd(x), given dL/dxhat."""
    return rstd * (grad_xhat - xhat * (grad_xhat * xhat).mean(-1, keepdim=True))


class WidthConnection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, static_alpha, static_beta, dyn_w, s_alpha, s_beta, norm_w,
                stream_eps, norm_eps, use_tanh, save_dtype):
        n = h.shape[-2]
        dynamic = dyn_w is not None
        if dynamic:
            stream_rstd = _rms(h, stream_eps)  # (B, T, n, 1)
            t = (h * stream_rstd) @ dyn_w  # (B, T, n, n+2)
            if use_tanh:
                t = t.tanh()
            alpha = t[..., : n + 1] * s_alpha + static_alpha  # (B, T, n, n+1)
            beta = t[..., n + 1] * s_beta + static_beta  # (B, T, n)
        else:
            stream_rstd = t = None
            alpha, beta = static_alpha, static_beta.clone()
        mix = alpha.transpose(-1, -2) @ h  # alpha^T H: (B, T, n+1, d)
        x, mixed = mix[..., 0, :], mix[..., 1:, :]  # A_m^T H (branch input), A_r^T H
        if norm_w is not None:
            x_rstd = _rms(x, norm_eps)
            out = x * x_rstd * norm_w
        else:
            x_rstd, out = None, x
        # H is the only n*d tensor kept; the rest is O(n^2) per token or parameters.
        ctx.save_for_backward(h.to(save_dtype), static_alpha, dyn_w, s_alpha, s_beta, norm_w,
                              alpha, stream_rstd, t, x_rstd)
        ctx.use_tanh = use_tanh
        return out, mixed, beta

    @staticmethod
    def backward(ctx, g_out, g_mixed, g_beta):
        (h, static_alpha, dyn_w, s_alpha, s_beta, norm_w, alpha, stream_rstd, t,
         x_rstd) = ctx.saved_tensors
        h = h.to(alpha.dtype)  # the compute dtype (fp32, or fp64)
        n, d = h.shape[-2], h.shape[-1]
        dynamic = dyn_w is not None
        lead = h.shape[:-2]  # (B, T)
        g_norm_w = None
        if norm_w is not None:
            # recompute the branch input A_m^T H; a contiguous (1, n) operand keeps bmm batched
            x = (alpha[..., :, 0].unsqueeze(-2).contiguous() @ h).squeeze(-2)
            xhat = x * x_rstd
            if ctx.needs_input_grad[6]:
                g_norm_w = (g_out * xhat).reshape(-1, d).sum(0)
            g_x = _rms_backward(g_out * norm_w, xhat, x_rstd)
        else:
            g_x = g_out
        if g_mixed is None:
            g_mixed = torch.zeros_like(h)
        g_mix = torch.cat([g_x.unsqueeze(-2), g_mixed], dim=-2)  # (B, T, n+1, d)
        g_h = alpha @ g_mix  # (B, T, n, d)
        g_alpha_tok = h @ g_mix.transpose(-1, -2)  # (B, T, n, n+1), per token
        g_static_alpha = g_static_beta = g_w = g_sa = g_sb = None
        if not dynamic:
            g_static_alpha = g_alpha_tok.reshape(-1, n, n + 1).sum(0)
            return g_h, g_static_alpha, g_beta, None, None, None, g_norm_w, None, None, None, None
        if g_beta is None:
            g_beta = torch.zeros(lead + (n,), dtype=h.dtype, device=h.device)
        g_static_alpha = g_alpha_tok.reshape(-1, n, n + 1).sum(0)
        g_static_beta = g_beta.reshape(-1, n).sum(0)
        t_alpha, t_beta = t[..., : n + 1], t[..., n + 1]
        g_sa = (g_alpha_tok * t_alpha).sum().reshape(1)
        g_sb = (g_beta * t_beta).sum().reshape(1)
        g_t = torch.cat([g_alpha_tok * s_alpha, (g_beta * s_beta).unsqueeze(-1)], dim=-1)
        if ctx.use_tanh:
            g_t = g_t * (1 - t.square())
        h_hat = h * stream_rstd
        g_w = h_hat.reshape(-1, d).transpose(0, 1) @ g_t.reshape(-1, n + 2)  # (d, n+2)
        g_h = g_h + _rms_backward(g_t @ dyn_w.transpose(0, 1), h_hat, stream_rstd)
        return (g_h, g_static_alpha, g_static_beta, g_w, g_sa, g_sb, g_norm_w, None, None, None, None)

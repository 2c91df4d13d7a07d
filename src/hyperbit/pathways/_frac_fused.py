"""Memory-lean frac-connection nodes in plain PyTorch (the counterpart of ``_hc_fused``).

Plain autograd keeps, per branch, the fractions F, the un-normed branch input x and, for dynamic
weights, the normed fractions and several per-token products. These two autograd nodes keep F
once (in its own dtype, or the autocast dtype when autocast is on, as every linear layer keeps its
input) plus per-token scalars, and recompute x = concat(A_m^T F) in backward; the depth node
keeps the branch output y (B's gradient needs it) and B. They compute in the dtype of the weights
they are given (fp32, or fp64) and return the branch input and the new state in the dtype of F.
Values and gradients are checked against the plain autograd reference
(:meth:`FracConnection.width_connection_reference`) in the tests.

Shapes: F (B, T, m, c) with c = d / m; static alpha = [A_m | A_r] (m, 2m), B (m,); dynamic weights
``Wt`` (2m+1, c), the transpose of ``[W_alpha | W_beta]``; gains s_alpha, s_beta (1,); branch-norm
weight (d,). As in ``_hc_fused``, ``z = P * r`` with ``P = F W`` and the per-fraction
``r = rsqrt(mean(F^2) + eps)`` equals ``norm(F) W``; backward, with ``g_z = dL/dz``:
``dL/dF = (g_z r) Wt - F r^3/c * sum_k g_z[k] P[k]`` and ``dL/dWt = (g_z r)^T F``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn.norm import rms_backward, rms_rstd
from ._hc_fused import _bmm, _project


#: up to this many fractions, a static weight gradient is summed from per-token (m, 2m) products
#: (one batched matmul, several times faster on CPU than the einsum's transposing copies); above,
#: one einsum (the per-token products would cost O(m^2) memory per token, and m can be d)
PER_TOKEN_MAX = 16


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``b`` (B, T, k, c) and ``a`` (j, k) static or (B, T, j, k) per token. A static
    ``a`` is one broadcast matmul (``_bmm`` would expand it per token: O(m^2) memory per token)."""
    if a.dim() == 2 and a.shape[-1] > 2:
        return torch.matmul(a, b)
    return _bmm(a, b)


def _outer_sum(h: Tensor, g: Tensor, per_token: bool) -> Tensor:
    """``sum_c h[..., j, c] g[..., a, c]``: (B, T, j, a) per token, or summed over the tokens (j, a).
    ``h`` (B, T, j, c), ``g`` (B, T, a, c)."""
    j, a = h.shape[-2], g.shape[-2]
    if per_token or j <= PER_TOKEN_MAX:
        out = _bmm(h, g.transpose(-1, -2))  # (B, T, j, a)
        return out if per_token else out.reshape(-1, j, a).sum(0)
    return torch.einsum("...jc,...ac->ja", h, g)


def mix(alpha: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha^T F``: the branch input ``concat(A_m^T F)`` (B, T, d) and ``H' = A_r^T F``
    (B, T, m, c), both views of one (B, T, 2m, c) product. ``alpha``: (m, 2m) or (B, T, m, 2m)."""
    m = h.shape[-2]
    out = _matmul(alpha.transpose(-1, -2), h)  # (B, T, 2m, c)
    return out[..., :m, :].flatten(-2), out[..., m:, :]


class FracWidth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, static_alpha, static_beta, dyn_wt, s_alpha, s_beta, norm_w,
                stream_eps, norm_eps, use_tanh, save_dtype):
        # the weights come in the compute dtype (fp32, or fp64); h in the state's dtype
        ctx.h_dtype, state = h.dtype, h
        h = h.to(static_alpha.dtype).contiguous()
        # the one copy of F kept for backward: in the save dtype, made from the original state
        saved = h if h.dtype == save_dtype else state.to(save_dtype).contiguous()
        m = h.shape[-2]
        if dyn_wt is not None:
            r = rms_rstd(h, stream_eps)  # (B, T, m, 1): per-fraction norm
            p = _project(h, dyn_wt)  # F W: (B, T, m, 2m+1)
            t = p * r
            if use_tanh:
                t = t.tanh()
            alpha = t[..., : 2 * m] * s_alpha + static_alpha  # (B, T, m, 2m)
            beta = t[..., 2 * m] * s_beta + static_beta  # (B, T, m)
        else:
            r = p = t = None
            alpha, beta = static_alpha, static_beta.clone()
        x, mixed = mix(alpha, h)  # (B, T, d), (B, T, m, c)
        x_rstd = rms_rstd(x, norm_eps)  # (B, T, 1)
        out = x * x_rstd * norm_w
        # F is the only full-size tensor kept; the rest is O(m^2) per token or parameters.
        # (dynamic: P and r are kept; tanh(P r) and the weights are recomputed in backward)
        ctx.save_for_backward(saved, static_alpha, dyn_wt, s_alpha, s_beta, norm_w, r, p, x_rstd)
        ctx.use_tanh = use_tanh
        return out.to(ctx.h_dtype), mixed, beta

    @staticmethod
    def backward(ctx, g_out, g_mixed, g_beta):
        with torch.autocast(g_out.device.type, enabled=False):  # backward may run under autocast
            return FracWidth._backward(ctx, g_out, g_mixed, g_beta)

    @staticmethod
    def _backward(ctx, g_out, g_mixed, g_beta):
        h, static_alpha, dyn_wt, s_alpha, s_beta, norm_w, r, p, x_rstd = ctx.saved_tensors
        compute = static_alpha.dtype  # fp32, or fp64
        alpha = t = None
        if dyn_wt is None:
            alpha = static_alpha
        else:  # recomputed exactly as in forward
            t = p * r
            if ctx.use_tanh:
                t = t.tanh()
            alpha = t[..., : 2 * h.shape[-2]] * s_alpha + static_alpha  # (B, T, m, 2m)
        h, g_out = h.to(compute), g_out.to(compute)
        m, c = h.shape[-2], h.shape[-1]
        d = m * c
        x = _matmul(alpha[..., :, :m].transpose(-1, -2), h).flatten(-2)  # recomputed A_m^T F
        xhat = x * x_rstd
        g_norm_w = (g_out * xhat).reshape(-1, d).sum(0) if ctx.needs_input_grad[6] else None
        g_x = rms_backward(g_out * norm_w, xhat, x_rstd)  # (B, T, d)
        g_mixed = torch.zeros_like(h) if g_mixed is None else g_mixed.to(compute)
        g_mix = torch.cat([g_x.unflatten(-1, (m, c)), g_mixed], dim=-2)  # (B, T, 2m, c)
        g_h = _matmul(alpha, g_mix)  # (B, T, m, c)
        if dyn_wt is None:
            g_static_alpha = _outer_sum(h, g_mix, per_token=False)  # (m, 2m), summed over tokens
            return (g_h.to(ctx.h_dtype), g_static_alpha, g_beta, None, None, None, g_norm_w,
                    None, None, None, None)
        g_alpha_tok = _outer_sum(h, g_mix, per_token=True)  # (B, T, m, 2m)
        g_static_alpha = g_alpha_tok.reshape(-1, m, 2 * m).sum(0)
        if g_beta is None:
            g_beta = torch.zeros_like(t[..., 0])
        g_static_beta = g_beta.reshape(-1, m).sum(0)
        g_sa = (g_alpha_tok * t[..., : 2 * m]).sum().reshape(1)
        g_sb = (g_beta * t[..., 2 * m]).sum().reshape(1)
        g_z = torch.cat([g_alpha_tok * s_alpha, (g_beta * s_beta).unsqueeze(-1)], dim=-1)
        if ctx.use_tanh:
            g_z = g_z * (1 - t.square())
        g_p = (g_z * r).reshape(-1, 2 * m + 1)  # dL/dP for P = F W, (B*T*m, 2m+1)
        g_wt = g_p.T.contiguous() @ h.reshape(-1, c)  # (2m+1, c)
        g_h = g_h.contiguous()
        g_h.view(-1, c).addmm_(g_p, dyn_wt)  # += dL/dP Wt
        g_h.addcmul_(h, (g_z * p).sum(-1, keepdim=True) * r.pow(3), value=-1.0 / c)  # via r(F)
        return (g_h.to(ctx.h_dtype), g_static_alpha, g_static_beta, g_wt, g_sa, g_sb, g_norm_w,
                None, None, None, None)


class FracDepth(torch.autograd.Function):
    """``F_i = H'_i + B_i y_i`` in one pass, rounded once to the state's dtype; keeps ``y`` in its
    own dtype and B, nothing else full-size."""

    @staticmethod
    def forward(ctx, mixed, beta, y, out_dtype):
        # mixed (B, T, m, c), beta (m,) or (B, T, m) in the compute dtype; y (B, T, d) any float
        m, c = mixed.shape[-2], mixed.shape[-1]
        out = torch.addcmul(mixed, beta.unsqueeze(-1), y.to(mixed.dtype).unflatten(-1, (m, c)))
        ctx.save_for_backward(beta, y)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):  # backward may run under autocast
            return FracDepth._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        beta, y = ctx.saved_tensors
        g = g.to(beta.dtype)
        m, c = g.shape[-2], g.shape[-1]
        g_beta = g_y = None
        if ctx.needs_input_grad[2]:
            g_y = (beta.unsqueeze(-1) * g).flatten(-2).to(y.dtype)  # B_i g_i, concatenated
        if ctx.needs_input_grad[1]:
            g_beta = (g * y.to(g.dtype).unflatten(-1, (m, c))).sum(-1)  # <g_i, y_i> per token
            if beta.dim() == 1:
                g_beta = g_beta.reshape(-1, m).sum(0)
        return g, g_beta, g_y, None

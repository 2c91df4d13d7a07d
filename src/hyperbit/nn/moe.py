"""Mixture-of-experts FFN: token-choice top-k routing over batched SwiGLU experts.

Per token x (d), with E experts of width ``hidden`` and k chosen per token::

    logits = W_r x                      (E,)  fp32 (fp64 for fp64) whatever the autocast dtype
    p      = softmax(logits)            (E,)
    S      = top-k(p)                   the k chosen experts
    w_e    = p_e / sum_{j in S} p_j     renormalised over the chosen k (k = 1: w_e = p_e, Switch)
    y      = sum_{e in S} w_e * down_e(silu(gate_e x) * up_e x)

With k = 1 the weight stays the probability itself: renormalised it would be the constant 1, and
the router would learn from the auxiliary losses only.

Experts are stored batched: ``gate_proj.weight`` and ``up_proj.weight`` are ``(E, hidden, d)``,
``down_proj.weight`` is ``(E, d, hidden)`` (:class:`ExpertLinear`). Dispatch has no Python loop
over tokens: the k*N assignments are sorted by expert (a stable sort, so priority order within an
expert) and the tokens gathered into rows grouped by expert (:func:`~hyperbit.nn.moe_dispatch.dispatch_plan`; in the
autocast dtype for fp experts); every expert multiplies only its own rows, one ``torch.mm`` per
expert and projection (gate and up fused into one); the outputs are scaled by their combine
weights and gathered back. Every token has exactly k assignments, so combining is a sum over k
accumulated in fp32. Both gathers have gathers as their backward (never a scatter-add:
deterministic on every device). One host sync per forward: the expert loads, which set the row
counts; none with a capacity off the CPU, where every expert gets ``cap`` rows
(``MoEFeedForward.static_capacity``).

Each expert's row count is rounded up to 4 significant bits (:func:`~hyperbit.nn.moe_dispatch.bucket_rows`: at most 1/8
more rows; none for an expert without tokens). The reason is oneDNN, which runs bf16 matmuls on
CPU: it JIT-compiles a kernel for every new matmul shape (1.5-2.5 ms each, measured), and the
loads change every step; rounded, the shapes recur and the kernels come from its cache. A padding
row holds a copy of token 0 and has combine weight 0, so it adds exactly zero to every gradient.

Measured on CPU (``benchmarks/moe_throughput.py``: d 256, 4 blocks, 8 experts top-2, bf16
autocast, whole training steps; a 2-core Xeon with AMX, shared, so noisy): 0.78x the dense model's
tokens/s (median of 10 runs, 0.65-0.98, 2 threads) against 0.67x (7 runs, 0.62-0.78) for the
earlier padded ``(E, C, d)`` buffer with one ``torch.bmm`` (C the largest load: a new shape, so
9-12 kernel compilations every step, and the padding C / (N k / E) - 1, 0.2-0.7 at init); after
warm-up 0.75x against 0.58x (2 threads), 0.79x against 0.64x (1 thread). About a third of what is
left is AdamW over 2.7x the parameters. Without the rounding this dispatch ran at 0.4-0.5x (1
thread); one ``torch.bmm`` over groups padded to a common bucketed size was no faster;
``F.grouped_mm`` has no fast CPU kernel.

Capacity: with factor c, an expert takes at most ``ceil(c * N * k / E)`` of the N*k assignments
of a forward (N tokens). Priority: every token's first choice before any second choice (and so
on); within a choice rank, tokens in batch order (row-major over ``(B, T)``). A dropped assignment
is not computed and contributes zero to its token (whose other choices still count, with their
weights unchanged); the count of dropped assignments is recorded.

Auxiliary values of every forward, in :attr:`MoEFeedForward.aux`:

* ``balance`` - the Switch / OLMoE load-balancing loss ``E * sum_i f_i P_i``, with f_i the
  fraction of the N*k assignments routed to expert i (before capacity drops; no gradient) and P_i
  the mean router probability of expert i. It is 1 for uniform routing and grows as routing skews.
* ``z`` - the router z-loss ``mean_tokens(logsumexp(logits)^2)``.
* ``dropped`` - the number of dropped assignments (a tensor), and ``assignments`` = N*k.

With ``linear="bitnet"`` the experts are BitNet b1.58 (:mod:`hyperbit.nn.bitlinear`): one
absmean weight scale per projection *per expert*, 8-bit absmax activations per token (each token's
row), the straight-through estimator; the router stays full precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bitlinear import EPS, _STE, ste_activation
from .moe_dispatch import _Combine, _Dispatch, _GroupedMatmul, _wide, dispatch_plan
from .norm import rms_rstd


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (a matmul's dtype), else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# -- BitNet b1.58 for a stack of expert weights ------------------------------------------------------
@torch.no_grad()
def quantize_expert_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Ternary codes (fp32) and the fp32 scale of every expert of ``w: (E, out, in)``: exactly
    :func:`~hyperbit.nn.bitlinear.quantize_weight` applied to each ``w[e]``; the scale has shape
    ``(E, 1, 1)``."""
    gamma = w.detach().float().abs().mean(dim=(1, 2), keepdim=True).clamp_(min=EPS)
    codes = (w.float() / gamma).round_().clamp_(-1, 1)
    return codes, gamma


def ste_expert_weight(w: Tensor) -> Tensor:
    """The quantised ``(E, out, in)`` weight in the forward, the identity in the backward."""
    codes, gamma = quantize_expert_weight(w)
    return _STE.apply(w, (codes * gamma).to(w.dtype))


class ExpertLinear(nn.Module):
    """E bias-free linears on rows grouped by expert: ``(M, in)`` with ``sizes`` rows per expert
    -> ``(M, out)``, weight ``(E, out, in)``.

    ``linear="bitnet"`` quantises as :class:`~hyperbit.nn.bitlinear.BitLinear` does, with one
    weight scale per expert."""

    def __init__(self, experts: int, in_features: int, out_features: int, linear: str = "fp"):
        super().__init__()
        if linear not in ("fp", "bitnet"):
            raise ValueError(f"linear={linear!r} is not allowed; choose one of ['fp', 'bitnet']")
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.bitnet = linear == "bitnet"
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))
        nn.init.normal_(self.weight, 0.0, in_features ** -0.5)

    def forward(self, x: Tensor, sizes: list[int]) -> Tensor:
        return self.fused_forward([self], x, sizes)

    @staticmethod
    def fused_forward(layers: list[ExpertLinear], x: Tensor, sizes: list[int]) -> Tensor:
        """``torch.cat([layer(x, sizes) for layer in layers], -1)`` with one matmul per expert: the
        weights concatenated (each quantised with its own scales for bitnet), x quantised once."""
        weights = [layer.weight for layer in layers]
        dtype = _compute_dtype(x)
        if layers[0].bitnet:
            x, weights = ste_activation(x), [ste_expert_weight(w) for w in weights]
        return _GroupedMatmul.apply(x.to(dtype), sizes, *weights)

    def extra_repr(self) -> str:
        kind = ", w1.58a8" if self.bitnet else ""
        return f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}{kind}"


class ExpertRMSNorm(nn.Module):
    """SubLN of every expert: RMSNorm over the last dim of rows grouped by expert (``sizes`` rows
    each) with one gain per expert, ``weight (E, hidden)``; fp32 statistics, the formula of
    :mod:`hyperbit.nn.norm`."""

    def __init__(self, experts: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(experts, dim))

    def forward(self, x: Tensor, sizes: list[int]) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        # each expert's gain on its rows (expand and cat: the backward is a sum, no scatter-add)
        gain = torch.cat([g.expand(rows, -1) for g, rows in zip(self.weight.to(xf.dtype), sizes)])
        y = xf * rms_rstd(xf, self.eps) * gain
        return y.to(x.dtype)

    def no_weight_decay(self) -> set[str]:
        return {"weight"}


class Router(nn.Linear):
    """``d -> E`` logits, computed in fp32 whatever the parameter and autocast dtypes. A subclass
    of ``nn.Linear``, so the model's init treats it as a linear while
    :func:`~hyperbit.nn.convert_to_bitlinear` (exact type match) leaves it full precision."""

    def __init__(self, dim: int, experts: int):
        super().__init__(dim, experts, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _wide(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))


# -- routing, as plain functions (tested on hand-made routings) ----------------------------------
def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``logits (N, E)`` -> probabilities ``(N, E)``, combine weights ``(N, k)`` (fp32) and the
    chosen experts ``(N, k)`` (int64, highest probability first)."""
    probs = torch.softmax(logits.to(_wide(logits.dtype)), dim=-1)
    top_p, experts = probs.topk(top_k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True) if top_k > 1 else top_p
    return probs, weights, experts


def capacity(tokens: int, top_k: int, experts: int, capacity_factor: float | None) -> int | None:
    """Most assignments one expert takes: ``ceil(c * tokens * k / E)``; None without a factor."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / experts)


def balance_loss(probs: Tensor, load: Tensor) -> Tensor:
    """``E * sum_i f_i P_i``: f_i = load_i / sum(load) (no gradient), P_i = mean_n probs[n, i]."""
    f = load.float() / load.sum().clamp(min=1)
    return probs.shape[-1] * (f * probs.mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """``mean_n logsumexp(logits[n])^2`` (fp32)."""
    return torch.logsumexp(logits.to(_wide(logits.dtype)), dim=-1).square().mean()


class MoEFeedForward(nn.Module):
    """Top-k mixture of SwiGLU experts, ``(..., d) -> (..., d)``. See the module docstring.

    Args:
        dim: model width d.
        hidden: width of every expert.
        experts: E. top_k: k <= E experts per token.
        capacity_factor: None (no dropping) or c > 0 (see :func:`capacity`).
        linear: ``"fp"`` or ``"bitnet"`` (the experts; the router stays full precision).
        subln: an RMSNorm (per-expert gain) before every expert's down projection.
    """

    output_projection = "down_proj"  # the experts' down projections (hyperbit.nn.branch)

    def __init__(self, dim: int, hidden: int, experts: int = 8, top_k: int = 2,
                 capacity_factor: float | None = None, linear: str = "fp", subln: bool = False,
                 norm_eps: float = 1e-6):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"moe_top_k={top_k} must be between 1 and moe_experts={experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"moe_capacity_factor must be > 0 or None, got {capacity_factor}")
        self.dim, self.hidden, self.experts, self.top_k = dim, hidden, experts, top_k
        self.capacity_factor = capacity_factor
        self.router = Router(dim, experts)
        self.gate_proj = ExpertLinear(experts, dim, hidden, linear)
        self.up_proj = ExpertLinear(experts, dim, hidden, linear)
        self.ffn_sub_norm = ExpertRMSNorm(experts, hidden, norm_eps) if subln else None
        self.down_proj = ExpertLinear(experts, hidden, dim, linear)
        self.aux: dict = {}  # the last forward's balance, z, dropped and assignments
        #: with a capacity, plan ``cap`` rows per expert without a host sync (``dispatch_plan``'s
        #: ``static``): None (default) off the CPU only, where a sync per layer stalls the stream
        self.static_capacity: bool | None = None

    def experts_forward(self, x: Tensor, sizes: list[int]) -> Tensor:
        """Every expert on its own rows: ``(M, d) -> (M, d)``, ``sizes`` rows per expert."""
        # the gate and up experts' class: ExpertLinear, or PackedExpertLinear (nn.packed_moe)
        fused = type(self.gate_proj).fused_forward
        gate, up = fused([self.gate_proj, self.up_proj], x, sizes).chunk(2, dim=-1)
        hidden = F.silu(gate) * up  # (M, hidden)
        if self.ffn_sub_norm is not None:
            hidden = self.ffn_sub_norm(hidden, sizes)
        return self.down_proj(hidden, sizes)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # (N, d)
        n, k = x.shape[0], self.top_k
        logits = self.router(x)  # (N, E) fp32
        probs, weights, chosen = route(logits, k)
        cap = capacity(n, k, self.experts, self.capacity_factor)
        static = self.static_capacity if self.static_capacity is not None else x.device.type != "cpu"
        plan = dispatch_plan(chosen, self.experts, cap, static)
        row_token = plan.row_assignment % n  # a padding row (k*N) reads token 0
        if not self.gate_proj.bitnet:  # dispatch in the dtype the experts compute in (autocast)
            x = x.to(_compute_dtype(x))
        rows = _Dispatch.apply(x, row_token, plan.row, k, cap is not None)  # (M, d)
        out = self.experts_forward(rows, plan.sizes)
        y = _Combine.apply(out, weights.t().reshape(-1), plan.row_assignment, row_token, plan.row, k,
                           cap is not None)
        self.aux = {"balance": balance_loss(probs, plan.load), "z": z_loss(logits),
                    "dropped": plan.dropped, "assignments": n * k}
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, top_k={self.top_k}, hidden={self.hidden}, "
                f"capacity_factor={self.capacity_factor}")


def moe_summary(layers: list[MoEFeedForward]) -> dict[str, Tensor]:
    """The last forward's auxiliaries over MoE ``layers``: ``moe_balance`` and ``moe_z`` (means
    over the layers, with gradients) and ``moe_dropped_frac`` (dropped / all assignments). Empty
    when no layer has run a forward."""
    ran = [layer.aux for layer in layers if layer.aux]
    if not ran:
        return {}
    return {"moe_balance": torch.stack([a["balance"] for a in ran]).mean(),
            "moe_z": torch.stack([a["z"] for a in ran]).mean(),
            "moe_dropped_frac": (torch.stack([a["dropped"] for a in ran]).sum().float()
                                 / sum(a["assignments"] for a in ran))}

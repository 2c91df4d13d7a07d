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
over tokens or experts: the k*N assignments are ranked inside their expert (a stable sort),
scattered into a padded buffer ``(E, C, d)`` (in the autocast dtype for fp experts), run through
three batched matmuls (``torch.bmm``), scaled row by row by their combine weights and gathered
back; every token has exactly k assignments, so combining is a sum over k accumulated in fp32 (no
scatter-add: deterministic on every device). C is the largest expert load (one host sync per
layer), or the capacity when ``capacity_factor`` is set (a static shape, no sync). Measured on
CPU (``benchmarks/moe_throughput.py``): faster than a loop over the experts on exact-size
segments and than ``F.grouped_mm``; its cost is the padding, C / (N k / E) - 1, largest when the
routing is unbalanced (at init), which the balance loss reduces.

Capacity: with factor c, an expert takes at most ``ceil(c * N * k / E)`` of the N*k assignments
of a forward (N tokens). Priority: every token's first choice before any second choice (and so
on); within a choice rank, tokens in batch order (row-major over ``(B, T)``). A dropped assignment
contributes zero to its token (whose other choices still count, with their weights unchanged);
the count of dropped assignments is recorded.

Auxiliary values of every forward, in :attr:`MoEFeedForward.aux`:

* ``balance`` - the Switch / OLMoE load-balancing loss ``E * sum_i f_i P_i``, with f_i the
  fraction of the N*k assignments routed to expert i (before capacity drops; no gradient) and P_i
  the mean router probability of expert i. It is 1 for uniform routing and grows as routing skews.
* ``z`` - the router z-loss ``mean_tokens(logsumexp(logits)^2)``.
* ``dropped`` - the number of dropped assignments (a tensor), and ``assignments`` = N*k.

With ``linear="bitnet"`` the experts are BitNet b1.58 (:mod:`hyperbit.nn.bitlinear`): one
absmean weight scale per projection *per expert*, 8-bit absmax activations per token (each token's
row of the buffer), the straight-through estimator; the router stays full precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bitlinear import EPS, _STE, ste_activation
from .norm import rms_rstd


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64: the dtype routing is computed in."""
    return torch.promote_types(dtype, torch.float32)


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
    """E bias-free linears applied batched: ``(E, C, in) -> (E, C, out)``, weight ``(E, out, in)``.

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

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.bitnet:
            x, w = ste_activation(x), ste_expert_weight(w)
        return torch.bmm(x, w.transpose(1, 2))  # (E, C, in) @ (E, in, out)

    def extra_repr(self) -> str:
        kind = ", w1.58a8" if self.bitnet else ""
        return f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}{kind}"


class ExpertRMSNorm(nn.Module):
    """SubLN of every expert: RMSNorm over the last dim of ``(E, C, hidden)`` with one gain per
    expert, ``weight (E, hidden)``; fp32 statistics, the formula of :mod:`hyperbit.nn.norm`."""

    def __init__(self, experts: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(experts, dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * rms_rstd(xf, self.eps) * self.weight.to(xf.dtype).unsqueeze(1)
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


def expert_slots(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Each assignment's rank inside its expert, in priority order, and every expert's load.

    ``experts (N, k)`` -> ``(slot (k*N,), load (E,))`` over the assignments in *choice-major*
    order (assignment ``j * N + n`` is token n's j-th choice): all first choices come before any
    second choice, and tokens in order within a choice rank."""
    flat = experts.t().reshape(-1)  # (k*N,) choice-major
    load = torch.bincount(flat, minlength=num_experts)  # (E,)
    order = torch.argsort(flat, stable=True)  # grouped by expert, priority order kept
    start = load.cumsum(0) - load  # (E,) first position of each expert's group
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    slot = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return slot, load


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

    def experts_forward(self, x: Tensor) -> Tensor:
        """Every expert on its own rows: ``(E, C, d) -> (E, C, d)``."""
        gate = self.gate_proj(x)
        hidden = F.silu(gate) * self.up_proj(x)  # (E, C, hidden)
        if self.ffn_sub_norm is not None:
            hidden = self.ffn_sub_norm(hidden)
        return self.down_proj(hidden)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)  # (N, d)
        n, k, e = x.shape[0], self.top_k, self.experts
        logits = self.router(x)  # (N, E) fp32
        probs, weights, chosen = route(logits, k)
        slot, load = expert_slots(chosen, e)  # (k*N,), (E,)
        flat = chosen.t().reshape(-1)  # (k*N,) expert of each assignment, choice-major
        cap = capacity(n, k, e, self.capacity_factor)
        if cap is None:
            rows, keep = int(load.max()), None  # the fullest expert (host sync)
            dropped = load.new_zeros(())
        else:
            rows = min(cap, n)  # an expert never gets more than N assignments (one per token)
            keep = slot < rows
            slot = torch.where(keep, slot, rows)  # dropped assignments go to a spare row
            dropped = (load - rows).clamp(min=0).sum()
            rows += 1
        if not self.gate_proj.bitnet:  # dispatch in the dtype the experts compute in (autocast)
            x = x.to(_compute_dtype(x))
        # dispatch: token n's copy for choice j sits at (expert, slot) of assignment j * N + n
        buf = x.new_zeros(e, rows, self.dim).index_put((flat, slot), x.repeat(k, 1))
        y_buf = self.experts_forward(buf)  # (E, rows, d)
        # each row times its combine weight, in the experts' dtype (a dropped one: times 0)
        w = weights.t().reshape(-1, 1)  # (k*N, 1) choice-major
        if keep is not None:
            w = torch.where(keep.unsqueeze(-1), w, w.new_zeros(()))
        w_buf = w.new_zeros(e, rows, 1).index_put((flat, slot), w).to(y_buf.dtype)
        out = (y_buf * w_buf)[flat, slot]  # (k*N, d) each assignment's weighted expert output
        # combine: every token has exactly k assignments: a sum over k (accumulated in fp32)
        y = out.view(k, n, self.dim).sum(0, dtype=_wide(out.dtype))
        self.aux = {"balance": balance_loss(probs, load), "z": z_loss(logits),
                    "dropped": dropped, "assignments": n * k}
        return y.to(out.dtype).reshape(shape)

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

"""A decoder-only transformer LM whose residual pathway and linear layers are swappable.

    tokens -> embed -> expand to n streams -> [Block] x L -> reduce (sum) -> final norm -> head

A block never adds anything itself; its two pathways own the norms and the residual additions.
The model is where a :class:`~hyperbit.config.ModelConfig` turns into modules: it chooses the
pathway of every branch and the linear layers of every projection.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.attention import Attention, KVCache, LayerKVCache
from ..nn.branch import output_projections
from ..nn.ffn import FeedForward
from ..nn.loss import cross_entropy
from ..nn.moe import ExpertLinear, MoEFeedForward, moe_summary
from ..nn.norm import RMSNorm
from ..nn.rope import RotaryEmbedding
from ..pathways import Pathway, make_pathway


def _pathway(cfg: ModelConfig, branch_index: int) -> Pathway:
    return make_pathway(cfg.pathway, cfg.dim, branch_index, expansion_rate=cfg.expansion_rate,
                        dynamic=cfg.hc_dynamic, use_tanh=cfg.hc_tanh, eps=cfg.norm_eps,
                        mhc_init=cfg.mhc_init, mhc_res=cfg.mhc_res,
                        sinkhorn_iters=cfg.mhc_sinkhorn_iters, frac_rate=cfg.frac_rate)


class Block(nn.Module):
    """Attention then FFN, each wrapped by its own pathway. ``cfg`` must be resolved."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len, cfg.rope_theta,
                              cfg.linear, cfg.subln, cfg.norm_eps, causal=cfg.arch == "lm", rope=rope)
        self.ffn = (MoEFeedForward(cfg.dim, cfg.ffn_hidden, cfg.moe_experts, cfg.moe_top_k,
                                   cfg.moe_capacity_factor, cfg.linear, cfg.subln, cfg.norm_eps)
                    if cfg.ffn == "moe" else
                    FeedForward(cfg.dim, cfg.ffn_hidden, cfg.ffn, cfg.linear, cfg.subln, cfg.norm_eps))
        self.attn_path = _pathway(cfg, branch_index=2 * layer_index)
        self.ffn_path = _pathway(cfg, branch_index=2 * layer_index + 1)
        self.attn_path.feeds_next = True  # forward below hands its output straight to ffn_path

    def branches(self) -> list[tuple[Pathway, nn.Module]]:
        """``(pathway, branch)`` pairs in execution order: what the wiring check and the init
        walk instead of attribute names."""
        return [(self.attn_path, self.attn), (self.ffn_path, self.ffn)]

    def forward(self, h: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        # With a KV cache the attention branch is bound to it; pathways only ever call branch(x)
        # (hyper-connections act per token, so attention is the only part that needs a cache).
        attn = self.attn if cache is None else (lambda x: self.attn(x, cache))
        h = self.attn_path(h, attn)  # width-connect -> norm -> attention -> depth-connect
        h = self.ffn_path(h, self.ffn)
        return h


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg = cfg.resolved()  # the sizes that were built
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        # One RoPE table for every layer (non-persistent buffers: not in the state_dict).
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i, self.rope) for i in range(cfg.n_layers))
        # The final norm reads reduce(state), the sum of n streams; at init every stream is the
        # Pre-Norm state h, so it reads n*h. rmsnorm(n*h; eps*n^2) = rmsnorm(h; eps) exactly, so
        # with eps*n^2 the model equals the Pre-Norm model of the same config at init (to fp32
        # round-off). n = 1 (Pre-/Post-Norm, HC with n = 1) keeps norm_eps as it is.
        n = cfg.expansion_rate  # 1 for Pre-/Post-Norm (the config requires it)
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps * n * n)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for the embedding and head; the blocks by :func:`init_blocks`."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, 0.0, std)
        init_blocks(self.blocks, self.cfg)

    def expand(self, h: Tensor) -> Tensor:
        """The embedding ``(B, T, d)`` as the pathways' state (``(B, T, n, d)`` for HC)."""
        return self.blocks[0].attn_path.expand(h)

    def reduce(self, h: Tensor) -> Tensor:
        """The pathways' state back to one ``(B, T, d)`` hidden state (the sum of the streams)."""
        return self.blocks[0].attn_path.reduce(h)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, V) and, with targets, the mean cross-entropy.

        With ``cache`` (from :meth:`make_cache`) the tokens continue the cached sequence: they sit
        at positions ``cache.pos ..`` and their keys/values are appended (incremental decoding)."""
        h = self.expand(self.embed(idx))  # (B, T, d), or (B, T, n, d) streams
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"KV cache has {len(cache)} layers, the model {len(self.blocks)} blocks")
        for i, block in enumerate(self.blocks):
            h = block(h) if cache is None else block(h, cache.layers[i])
        h = self.reduce(h)  # (B, T, d)
        logits = self.head(self.final_norm(h))
        loss = None
        if targets is not None:
            # fp32 log-sum-exp without an fp32 copy of the logits (hyperbit.nn.loss)
            loss = cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if loss is not None and self.training and self.cfg.ffn == "moe":
            loss = loss + self.moe_aux_loss()  # training objective only; eval stays cross-entropy
        return logits, loss

    def moe_stats(self) -> dict[str, Tensor]:
        """The last forward's MoE auxiliaries (:func:`hyperbit.nn.moe.moe_summary`): ``moe_balance``
        and ``moe_z`` (means over the layers) and ``moe_dropped_frac``; {} for a dense model."""
        return moe_summary([b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)])

    def moe_aux_loss(self) -> Tensor:
        """``moe_balance_coef * balance + moe_z_coef * z`` of the last forward."""
        stats = self.moe_stats()
        return self.cfg.moe_balance_coef * stats["moe_balance"] + self.cfg.moe_z_coef * stats["moe_z"]

    def make_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to ``max_len`` tokens (default ``cfg.max_seq_len``)."""
        return KVCache(len(self.blocks), self.cfg.max_seq_len if max_len is None else max_len)

    def pathways(self) -> list[Pathway]:
        """All 2L pathways in execution order."""
        return [p for b in self.blocks for p, _ in b.branches()]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """The real parameter count (shared tensors counted once)."""
        seen = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in seen.values())
        return total - self.embed.weight.numel() if exclude_embeddings else total


def init_blocks(blocks: nn.ModuleList, cfg: ModelConfig) -> None:
    """Normal(0, init_std) for every linear weight of every branch; the output projection each
    branch declares (:mod:`hyperbit.nn.branch`) additionally scaled by 1/sqrt(2L) (depth) and
    1/sqrt(n) (n summed streams, spec section 2)."""
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers) / math.sqrt(cfg.expansion_rate)
    for block in blocks:
        for _, branch in block.branches():
            outputs = {id(m) for m in output_projections(branch)}
            for module in branch.modules():
                if isinstance(module, (nn.Linear, ExpertLinear)):  # experts: (E, out, in)
                    nn.init.normal_(module.weight, 0.0, out_std if id(module) in outputs else std)


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Parameter count computed analytically from the config (tested against the real count).
    ``active``: the parameters one token uses (MoE: the router and top_k of the experts)."""
    cfg = cfg.resolved()
    d, L, V, hidden = cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.ffn_hidden
    kv = cfg.n_kv_heads * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv + (d if cfg.subln else 0)
    ffn = 3 * d * hidden + (hidden if cfg.subln else 0)
    if cfg.ffn == "moe":  # the router, then every expert (with its own SubLN gain)
        ffn = d * cfg.moe_experts + (cfg.moe_top_k if active else cfg.moe_experts) * ffn
    per_branch = d + pathway_params(cfg)  # the branch norm plus the connection's own parameters
    embed_head = V * d * (1 if cfg.tie_embeddings else 2)
    if cfg.arch == "vit":  # patch embedding, class token, head (hyperbit.models.ViT)
        embed_head = (cfg.channels * cfg.patch_size ** 2 * d + (d if cfg.pool == "cls" else 0)
                      + d * cfg.n_classes)
    return embed_head + d + L * (attn + ffn + 2 * per_branch)


def pathway_params(cfg: ModelConfig) -> int:
    """Connection parameters per branch (spec section 3): SHC n(n+2); DHC d(n+2) + n(n+2) + 2 + 0
    (the stream norm is parameter-free). Frac-connections with m fractions of c = d/m: static
    m(2m+1); dynamic m(2m+1) + c(2m+1) + 2. mHC: k(nd + 1) + 3 with k = 2n + n^2 (n! res logits
    for mhc_res="permutations"). Fixed presets and plain residuals have none."""
    if cfg.pathway == "frac":
        m, c = cfg.frac_rate, cfg.dim // cfg.frac_rate
        return m * (2 * m + 1) + ((c * (2 * m + 1) + 2) if cfg.hc_dynamic else 0)
    n, d = cfg.expansion_rate, cfg.dim
    if cfg.pathway == "mhc":  # phi (k, nd), biases (k), 3 gates; k = 2n + n^2 (or n! permutations)
        k = 2 * n + (math.factorial(n) if cfg.mhc_res == "permutations" else n * n)
        return k * (n * d + 1) + 3
    if cfg.pathway != "hc":
        return 0
    return n * (n + 2) + ((d * (n + 2) + 2) if cfg.hc_dynamic else 0)

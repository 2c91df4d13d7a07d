"""A vision transformer whose residual pathway and linear layers are swappable, like the LM's.

    images (B, C, H, W) -> patches (B, P, C*p*p) -> patch embedding -> [class token] ->
    expand to n streams -> [Block] x L (bidirectional attention) -> reduce -> final norm ->
    class token or mean over patches -> head -> class logits (B, n_classes)

The blocks are the LM's :class:`~hyperbit.models.lm.Block` (any pathway, fp or BitNet linears,
dense or mixture-of-experts FFN) with non-causal attention; positions are RoPE over the patches in
raster order (the class token sits at position 0). The patch embedding, the class token and the
head stay in full precision, like the LM's embedding and head. As for the LM, every pathway equals
Pre-Norm at init (the tests prove it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..nn.norm import RMSNorm
from ..nn.rope import RotaryEmbedding
from ..pathways import Pathway
from .lm import Block, TransformerLM, init_blocks


class PatchEmbedding(nn.Module):
    """images ``(B, C, H, W)`` -> tokens ``(B, T, d)``: a linear map of every p x p patch (raster
    order), after a learned class token when ``cls_token`` (T = patches + 1)."""

    def __init__(self, channels: int, image_size: int, patch_size: int, dim: int, cls_token: bool):
        super().__init__()
        self.channels, self.image_size, self.patch_size = channels, image_size, patch_size
        self.n_patches = (image_size // patch_size) ** 2
        self.proj = nn.Linear(channels * patch_size ** 2, dim, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None

    @property
    def weight(self) -> Tensor:
        """The patch projection's weight (what "the embedding" means to the analyses)."""
        return self.proj.weight

    def patchify(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, P, C*p*p)``: non-overlapping p x p patches in raster order."""
        C, S, p = self.channels, self.image_size, self.patch_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (C, S, S):
            raise ValueError(f"ViT expects images (B, {C}, {S}, {S}), got {tuple(images.shape)}")
        B = images.shape[0]
        x = images.reshape(B, C, S // p, p, S // p, p)  # (B, C, H/p, p, W/p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, self.n_patches, C * p * p)

    def forward(self, images: Tensor) -> Tensor:
        h = self.proj(self.patchify(images).to(self.proj.weight.dtype))  # (B, P, d)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], 1, -1).to(h.dtype), h], dim=1)
        return h


class ViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "vit":
            raise ValueError(f"ViT needs a config with arch='vit', got arch={cfg.arch!r}")
        self.cfg = cfg = cfg.resolved()
        self.embed = PatchEmbedding(cfg.channels, cfg.image_size, cfg.patch_size, cfg.dim,
                                    cls_token=cfg.pool == "cls")
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # one table
        self.blocks = nn.ModuleList(Block(cfg, i, self.rope) for i in range(cfg.n_layers))
        n = cfg.expansion_rate  # the final norm reads the sum of n equal streams at init: eps * n^2
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps * n * n)
        self.head = nn.Linear(cfg.dim, cfg.n_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for the patch embedding, class token and head; the blocks as the
        LM initialises them (output projections scaled by 1/sqrt(2L) and 1/sqrt(n))."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.proj.weight, 0.0, std)
        nn.init.normal_(self.head.weight, 0.0, std)
        if self.embed.cls_token is not None:
            nn.init.normal_(self.embed.cls_token, 0.0, std)
        init_blocks(self.blocks, self.cfg)

    def patchify(self, images: Tensor) -> Tensor:
        return self.embed.patchify(images)

    def example_input(self, batch: int = 2) -> Tensor:
        """A small random batch of images (what the wiring check feeds the model)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
        return images.to(self.head.weight.device)

    def expand(self, h: Tensor) -> Tensor:
        return self.blocks[0].attn_path.expand(h)

    def reduce(self, h: Tensor) -> Tensor:
        return self.blocks[0].attn_path.reduce(h)

    def features(self, images: Tensor) -> Tensor:
        """The pooled, normed representation ``(B, d)`` the head reads."""
        h = self.expand(self.embed(images))
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(self.reduce(h))  # (B, T, d)
        return h[:, 0] if self.embed.cls_token is not None else h.mean(dim=1)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """images ``(B, C, H, W)`` -> class logits ``(B, n_classes)`` and, with targets ``(B,)``,
        the mean cross-entropy (computed in fp32)."""
        logits = self.head(self.features(images))
        loss = None if targets is None else F.cross_entropy(logits.float(), targets)
        if loss is not None and self.training and self.cfg.ffn == "moe":
            loss = loss + self.moe_aux_loss()  # training objective only; eval stays cross-entropy
        return logits, loss

    # the MoE auxiliaries of the last forward, as for the LM (the blocks are the same)
    moe_stats = TransformerLM.moe_stats
    moe_aux_loss = TransformerLM.moe_aux_loss

    def pathways(self) -> list[Pathway]:
        return [p for b in self.blocks for p, _ in b.branches()]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """The real parameter count; ``exclude_embeddings`` leaves out the patch embedding."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.proj.weight.numel() if exclude_embeddings else total


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> TransformerLM | ViT:
    """The model ``cfg`` describes (a :class:`TransformerLM`, or a :class:`ViT` for
    ``arch="vit"``) on ``device`` (``"meta"`` allocates nothing: for counting)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return ViT(cfg) if cfg.arch == "vit" else TransformerLM(cfg)

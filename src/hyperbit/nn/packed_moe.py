"""PackedExpertLinear: the inference form of a BitNet :class:`~hyperbit.nn.moe.ExpertLinear`.

Storage, per expert ``e`` exactly as :class:`~hyperbit.nn.packed.PackedBitLinear` stores one
weight (spec ``bitnet.md`` section 4)::

    packed        uint8, shape (E, out_features / 4, in_features): expert e's ternary codes,
                  four rows per byte (:func:`~hyperbit.nn.packed.pack_ternary`)
    weight_scale  fp32, shape (E,): expert e's gamma = max(mean|W_e|, eps)

1/16 of the fp32 experts' bytes. Forward, as PackedBitLinear's: the activations quantised per
token to int8 (as the latent BitNet experts quantise them), then per expert the exact integer
product of its rows with its codes (:func:`~hyperbit.nn.packed.int8_matmul`), each output scaled
by the expert's gamma and divided by the row's scale in fp32: the latent layer's values to fp32
round-off (that layer rounds every partial sum of a float product). No float copy of an expert
weight is made; the int8 codes are unpacked once and cached (never saved; dropped when a state
dict is loaded or the module moves).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bitlinear import EPS
from .moe import ExpertLinear, _compute_dtype, quantize_expert_weight
from .packed import PackedTernary, int8_matmul, pack_ternary, quantize_rows, unpack_ternary


class PackedExpertLinear(PackedTernary):
    """E packed ternary linears on rows grouped by expert (module docstring); ``state_dict`` holds
    only ``packed`` and ``weight_scale``."""

    bitnet = True  # read by MoEFeedForward (dispatch dtype), as ExpertLinear.bitnet

    def __init__(self, experts: int, in_features: int, out_features: int, device=None):
        super().__init__()
        if out_features % 4:
            raise ValueError(f"out_features={out_features} is not a multiple of 4; packed ternary "
                             "weights need four rows per byte")
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.register_buffer("packed", torch.full((experts, out_features // 4, in_features), 0b01010101,
                                                  dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.full((experts,), EPS, dtype=torch.float32, device=device))
        self.codes: Tensor | None = None  # int8 (E, out, in), unpacked on first use

    @classmethod
    @torch.no_grad()
    def from_expert_linear(cls, layer: ExpertLinear) -> "PackedExpertLinear":
        """Pack a BitNet ``ExpertLinear`` (its weights quantised as its forward quantises them)."""
        if not layer.bitnet:
            raise ValueError("cannot pack full-precision experts (linear='fp')")
        codes, gamma = quantize_expert_weight(layer.weight)
        new = cls(layer.experts, layer.in_features, layer.out_features, device=layer.weight.device)
        for e in range(layer.experts):
            new.packed[e].copy_(pack_ternary(codes[e]))
        new.weight_scale.copy_(gamma.view(-1))
        return new

    def _drop_codes(self) -> None:
        self.codes = None

    _moved = _drop_codes  # the cached codes are a plain attribute, which a move leaves behind

    def unpacked_codes(self) -> Tensor:
        """The int8 ``(E, out, in)`` codes, unpacked on first use and cached."""
        if self.codes is None or self.codes.device != self.packed.device:
            self.codes = torch.stack([unpack_ternary(p) for p in self.packed])
        return self.codes

    def forward(self, x: Tensor, sizes: list[int]) -> Tensor:
        return self.fused_forward([self], x, sizes)

    @staticmethod
    def fused_forward(layers: list["PackedExpertLinear"], x: Tensor, sizes: list[int]) -> Tensor:
        """``ExpertLinear.fused_forward`` of the latent layers: ``x (M, in)``, ``sizes`` rows per
        expert, quantised once; one integer product per expert over all ``layers``' codes; the
        result in the dtype the latent layers compute in (the autocast dtype, else ``x``'s)."""
        xq, s = quantize_rows(x)  # (M, K) int8, (M, 1) fp32
        codes = (layers[0].unpacked_codes() if len(layers) == 1 else
                 torch.cat([m.unpacked_codes() for m in layers], dim=1))  # (E, N, K) int8
        scale = torch.cat([m.weight_scale.view(-1, 1).expand(-1, m.out_features) for m in layers], dim=1)
        out = torch.zeros(x.shape[0], codes.shape[1], dtype=torch.float32, device=x.device)
        for e, (xq_e, s_e, out_e) in enumerate(zip(xq.split(sizes), s.split(sizes), out.split(sizes))):
            if xq_e.shape[0]:
                torch.mul(int8_matmul(xq_e, codes[e].t()).float(), scale[e] / s_e, out=out_e)
        return out.to(_compute_dtype(x))

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, packed ternary")

"""PackedBitLinear: inference form of a BitLinear, 2-bit ternary codes and integer matmul.

Storage (spec ``bitnet.md`` section 4, the Hugging Face ``bitnet`` offline layout)::

    packed        uint8, shape (out_features / 4, in_features)
    weight_scale  fp32 scalar gamma = max(mean|W|, eps) (multiplies: W_q = codes * gamma)

Each ternary code ``c`` in {-1, 0, +1} is stored as the 2-bit field ``c + 1`` (0, 1, 2; the
pattern 3 is never written). With ``R = out_features / 4``, byte ``packed[i, j]`` holds the codes
of weight rows ``i, i + R, i + 2R, i + 3R`` (column ``j``) at bit offsets 0, 2, 4, 6::

    packed[i, j] = (c[i, j] + 1) | (c[i + R, j] + 1) << 2 | (c[i + 2R, j] + 1) << 4
                                 | (c[i + 3R, j] + 1) << 6

``out_features`` must be a multiple of 4 (refused with a ValueError otherwise: padding rows would
make the packed shape no longer say how many rows there are). The packed weight is exactly 1/16
of the fp32 weight's bytes. Here ``weight_scale`` multiplies; whether a Hugging Face ``bitnet``
checkpoint's scale multiplies or divides is for an exporter to check against the installed
``transformers``.

Forward: the codes are unpacked once into an int8 buffer ``codes`` (lazily, on the first forward;
not saved in ``state_dict``, dropped when a state dict is loaded), then every call quantises the
activations per token exactly as ``BitLinear`` does (``s = 127 / max|x|``, ``x_q = clamp(round(x
s), -128, 127)``) to int8, multiplies ``x_q @ codes^T`` in integer arithmetic (``torch._int_mm``,
int8 x int8 -> int32; exact), and rescales ``acc * (gamma / s)`` in fp32. The output has the
input's dtype. No float copy of the weight is ever made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bitlinear import EPS, quantize_weight

# torch._int_mm shape rules per device type: (min M, K multiple, N multiple). The CPU build
# (checked on torch 2.13) takes any shape; CUDA needs M > 16 and K, N multiples of 8.
INT_MM_SHAPES: dict[str, tuple[int, int, int]] = {"cpu": (1, 1, 1), "cuda": (17, 8, 8)}


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ``(out, in)`` ternary codes (any dtype, values in {-1, 0, 1}) into ``(out/4, in)`` uint8."""
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D (out, in) tensor, got shape {tuple(codes.shape)}")
    out, cols = codes.shape
    if out % 4:
        raise ValueError(f"out_features={out} is not a multiple of 4; packed ternary weights need "
                         "four rows per byte")
    c = codes.detach().to(torch.int16)
    fractional = codes.is_floating_point() and not torch.equal(codes.detach().float(), c.float())
    if fractional or ((c < -1) | (c > 1)).any():
        raise ValueError("pack_ternary expects codes in {-1, 0, 1}")
    u = (c + 1).to(torch.uint8).view(4, out // 4, cols)
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_ternary(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_ternary`: ``(R, in)`` uint8 -> ``(4R, in)`` int8 codes."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1, 1)
    fields = (packed.unsqueeze(0) >> shifts) & 3
    return (fields.to(torch.int8) - 1).reshape(4 * packed.shape[0], packed.shape[1])


def _exact_int32_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer product without ``torch._int_mm``: int32 matmul on CPU; elsewhere fp64 (exact
    for |sums| < 2**53, far beyond int8 x int8 products)."""
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32)
    return (a.double() @ b.double()).to(torch.int32)


def int8_matmul(a: Tensor, b: Tensor, *, use_int_mm: bool = True,
                shapes: tuple[int, int, int] | None = None) -> Tensor:
    """``(M, K)`` int8 @ ``(K, N)`` int8 -> ``(M, N)`` int32, exactly.

    Uses ``torch._int_mm``, zero-padding M, K and N up to the device's rules (``INT_MM_SHAPES``,
    or ``shapes``); zero rows/columns change no sum, and the result is sliced back. With
    ``use_int_mm=False`` (or a torch without ``_int_mm``) an exact int32 path is taken instead.
    """
    if not use_int_mm or not hasattr(torch, "_int_mm"):
        return _exact_int32_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    min_m, k_mult, n_mult = shapes or INT_MM_SHAPES.get(a.device.type, INT_MM_SHAPES["cuda"])
    pm, pk, pn = max(min_m - m, 0), -k % k_mult, -n % n_mult
    if pm or pk:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:  # only for K / N not multiples of 8 on CUDA; real model widths never are
        b = F.pad(b, (0, pn, 0, pk))
    out = torch._int_mm(a, b)
    return out[:m, :n] if (pm or pn) else out


class PackedBitLinear(nn.Module):
    """Bias-free ternary linear for inference; ``state_dict`` holds only ``packed`` and ``weight_scale``."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        if out_features % 4:
            raise ValueError(f"out_features={out_features} is not a multiple of 4; packed ternary "
                             "weights need four rows per byte")
        self.in_features, self.out_features = in_features, out_features
        self.use_int_mm = True
        self.register_buffer("packed", torch.full((out_features // 4, in_features), 0b01010101,
                                                  dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.tensor(EPS, dtype=torch.float32, device=device))
        self.register_buffer("codes", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module._drop_codes())

    @classmethod
    def from_bitlinear(cls, layer: nn.Linear) -> "PackedBitLinear":
        """Pack a ``BitLinear`` (or any bias-free ``nn.Linear``, quantised the BitLinear way)."""
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"expected a BitLinear / nn.Linear, got {type(layer).__name__}")
        if layer.bias is not None:
            raise ValueError("cannot pack a linear layer with a bias (BitLinear has none)")
        if getattr(layer, "quant_strength", 1.0) < 1.0:
            raise ValueError("cannot pack a BitLinear in lambda warm-up (quant_strength < 1): its "
                             "forward is not the ternary one")
        codes, gamma = quantize_weight(layer.weight)
        new = cls(layer.in_features, layer.out_features, device=layer.weight.device)
        new.packed.copy_(pack_ternary(codes))
        new.weight_scale.copy_(gamma)
        return new

    def _drop_codes(self) -> None:
        self.codes = None

    def _apply(self, fn, recurse=True):
        """``module.to(torch.bfloat16)`` / ``.half()`` move the scale with the module but keep it
        fp32: gamma is scale arithmetic, which is fp32 whatever the activations' dtype."""
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self

    def unpacked_codes(self) -> Tensor:
        """The int8 ``(out, in)`` codes, unpacked on first use and cached."""
        if self.codes is None or self.codes.device != self.packed.device:
            self.codes = unpack_ternary(self.packed)
        return self.codes

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).float()
        s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)
        xq = (xf * s).round_().clamp_(-128, 127).to(torch.int8)
        acc = int8_matmul(xq, self.unpacked_codes().t(), use_int_mm=self.use_int_mm)
        y = acc.float() * (self.weight_scale / s)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed 2-bit ternary"

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

Forward: every call quantises the activations per token exactly as ``BitLinear`` does (``s = 127 /
max|x|``, ``x_q = clamp(round(x s), -128, 127)``) to int8, multiplies ``x_q @ codes^T`` in integer
arithmetic (int8 x int8 -> int32: exact), scales each output row by its ``gamma`` and divides by
``s`` in fp32. The output has the input's dtype. The weight the kernel reads is derived from the
codes once, on the first forward, and cached (never saved in ``state_dict``; dropped when a state
dict is loaded or the module moves):

- by default: the int8 ``(out, in)`` codes (the ``codes`` buffer) and ``torch._int_mm`` (padded
  to the device's shape rules), or an exact int32 / fp64 product without it (``use_int_mm=False``);
- opt-in on CPUs with oneDNN (``use_onednn = True``; ``onednn_available()`` checks once per
  process that it gives the exact int32 product): the codes prepacked into oneDNN's blocked int8
  layout (``torch.ops.onednn.qlinear_prepack``) with per-row fp32 scales, one s8 x s8 GEMM / GEMV
  with int32 accumulation and the row scale applied once. Side by side on a 2-core Xeon it was not
  faster than ``torch._int_mm`` (``docs/benchmarks.md``), so it is not the default.

No float copy of the weight is ever made. :meth:`PackedBitLinear.fused_forward` runs several
layers that read the same input (q/k/v, gate/up) as one product: the activation is quantised once
and the codes of all layers are concatenated once (cached) with one scale per output row, so each
layer keeps its own ``gamma`` and the outputs equal separate calls bit for bit.
"""

from __future__ import annotations

import functools

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


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's int8 linear kernels run here and give the exact integer product (checked
    once on a small probe; any failure means the ``torch._int_mm`` path is used instead)."""
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (3, 72), generator=gen, dtype=torch.int8)
        w = torch.randint(-1, 2, (16, 72), generator=gen, dtype=torch.int8)
        scale = torch.rand(16, generator=gen) + 0.5
        got = _onednn_mm(a, torch.ops.onednn.qlinear_prepack(w, [1, 72]), scale, torch.zeros(16, dtype=torch.long))
        want = (a.to(torch.int32) @ w.to(torch.int32).t()).float() * scale
        return bool(torch.equal(got, want))
    except Exception:  # no oneDNN build, an unsupported CPU, a changed signature
        return False


def _onednn_mm(xq: Tensor, weight: Tensor, row_scale: Tensor, zeros: Tensor) -> Tensor:
    """``(M, K)`` int8 x prepacked int8 codes -> ``(M, N)`` fp32 ``acc * row_scale`` (acc exact)."""
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, weight, row_scale, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _version(t: Tensor) -> int:
    """In-place update counter (inference-mode tensors have none and cannot be updated outside it)."""
    return -1 if t.is_inference() else t._version


def quantize_rows(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 codes ``(M, K)`` and fp32 scales ``s`` ``(M, 1)`` (as ``BitLinear``)."""
    xf = x2d.float()
    s = 127.0 / torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True).clamp_(min=EPS)
    # |x| * 127 / max|x| <= 127 (to one rounding, which round() absorbs): no clamp to [-128, 127]
    return (xf * s).round_().to(torch.int8), s


class PackedTernary(nn.Module):
    """What the packed ternary layers share: ``weight_scale`` moves with the module but stays fp32
    (gamma is scale arithmetic, fp32 whatever the activations' dtype), and what is derived from the
    codes is cached, dropped when a state dict is loaded (:meth:`_drop_codes`) and when the module
    moves or is cast (:meth:`_moved`)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(lambda module, keys: module._drop_codes())

    def _drop_codes(self) -> None:
        raise NotImplementedError

    def _moved(self) -> None:
        """Drop what a move or cast leaves stale (called after every ``_apply``)."""

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        self._moved()
        return self


class PackedBitLinear(PackedTernary):
    """Bias-free ternary linear for inference; ``state_dict`` holds only ``packed`` and ``weight_scale``.

    ``use_int_mm`` (default True) and ``use_onednn`` (class default False) choose the kernel
    (module docstring); every choice gives the same integer product."""

    use_onednn = False

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
        self._kernels: dict[tuple[int, ...], tuple] = {}  # fused / prepacked weights, by layer ids

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
        self._kernels = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_kernels"] = {}  # opaque prepacked tensors are rebuilt, not copied or pickled
        return state

    def _moved(self) -> None:
        self._kernels = {}  # the codes buffer moves with the module; the prepacked weights do not

    def unpacked_codes(self) -> Tensor:
        """The int8 ``(out, in)`` codes, unpacked on first use and cached."""
        if self.codes is None or self.codes.device != self.packed.device:
            self.codes = unpack_ternary(self.packed)
        return self.codes

    def _uses_onednn(self) -> bool:
        return (self.packed.device.type == "cpu" and self.use_onednn and self.use_int_mm
                and onednn_available())

    @staticmethod
    def _kernel(layers: list["PackedBitLinear"], onednn: bool) -> tuple:
        """The weight the product reads for ``layers`` (concatenated along the output), cached on
        ``layers[0]`` and rebuilt when any layer's codes or scale change: ``(weight, row_scale,
        zeros)`` for oneDNN, ``(codes, row_scale)`` for the generic path."""
        ids = tuple(map(id, layers))
        state = [(m.packed.data_ptr(), _version(m.packed), _version(m.weight_scale)) for m in layers]
        hit = layers[0]._kernels.get(ids)
        if hit is not None and hit[0] == (state, onednn):
            return hit[1]
        rows = [m.weight_scale.expand(m.out_features) for m in layers]
        row_scale = torch.cat(rows).float().contiguous()  # (N,): each layer's gamma on its rows
        if len(layers) == 1 and not onednn:
            layers[0].codes = unpack_ternary(layers[0].packed)  # (N, K) int8, kept as the buffer
            kernel = (layers[0].codes, layers[0].weight_scale)
        else:
            codes = torch.cat([unpack_ternary(m.packed) for m in layers])  # (N, K) int8, transient
            if onednn:
                zeros = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
                kernel = (torch.ops.onednn.qlinear_prepack(codes, [1, codes.shape[1]]), row_scale, zeros)
            else:
                kernel = (codes, row_scale)
        layers[0]._kernels[ids] = ((state, onednn), kernel)
        return kernel

    @classmethod
    def fused_forward(cls, layers: list["PackedBitLinear"], x: Tensor) -> tuple[Tensor, ...]:
        """``tuple(layer(x) for layer in layers)`` as one product: ``x`` quantised once, one int8
        GEMM over the concatenated codes (cached), each output row scaled by its own layer's
        gamma. Equal to separate calls bit for bit."""
        k = layers[0].in_features
        if any(m.in_features != k for m in layers):
            raise ValueError(f"fused_forward needs layers of one in_features, got {[m.in_features for m in layers]}")
        if x.shape[-1] != k:
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {k}")
        lead = x.shape[:-1]
        xq, s = quantize_rows(x.reshape(-1, k))  # (M, K) int8, (M, 1) fp32
        first = layers[0]
        onednn = first._uses_onednn() and xq.shape[0] > 0
        kernel = cls._kernel(layers, onednn)
        if onednn:
            y = _onednn_mm(xq, *kernel).div_(s)  # (M, N): acc * gamma_row / s
        else:
            codes, row_scale = kernel
            acc = int8_matmul(xq, codes.t(), use_int_mm=first.use_int_mm)
            y = acc.float().mul_(row_scale / s) if row_scale.dim() else acc.float() * (row_scale / s)
        outs = y.split([m.out_features for m in layers], dim=-1)
        return tuple(o.to(x.dtype).reshape(*lead, o.shape[-1]) for o in outs)

    def forward(self, x: Tensor) -> Tensor:
        # fused_forward([self], x)[0], without its list handling: at one token per call (decoding)
        # the product is tens of microseconds and every Python-side step shows
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        xq, s = quantize_rows(x.reshape(-1, self.in_features))  # (M, K) int8, (M, 1) fp32
        onednn = self._uses_onednn() and xq.shape[0] > 0
        kernel = self._kernel([self], onednn)
        if onednn:
            y = _onednn_mm(xq, *kernel).div_(s)  # (M, N): acc * gamma / s
        else:
            y = int8_matmul(xq, kernel[0].t(), use_int_mm=self.use_int_mm).float() * (kernel[1] / s)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed 2-bit ternary"

"""PackedBitLinear (spec ``bitnet.md`` section 4): 2-bit packing round trip, integer-matmul forward
equal to BitLinear's training form, 1/16 storage, state-dict round trip, no per-forward unpacking,
and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hyperbit.nn.packed as packed_mod
from hyperbit.nn.bitlinear import BitLinear, quantize_activation, quantize_weight
from hyperbit.nn.packed import PackedBitLinear, int8_matmul, pack_ternary, unpack_ternary


def _layer(k: int, n: int, seed: int = 0) -> BitLinear:
    torch.manual_seed(seed)
    return BitLinear(k, n)


def _exact(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``(x_codes @ w_codes^T) * gamma / s`` in fp64: the value the integer path must hit."""
    xc, s = quantize_activation(x)
    wc, gamma = quantize_weight(layer.weight)
    return (xc.double() @ wc.double().t()) * gamma.double() / s.double()


# --- packing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 1), (8, 3), (64, 33), (256, 128), (12, 1000)])
def test_pack_unpack_round_trip_is_exact(shape):
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    p = pack_ternary(codes)
    assert p.dtype == torch.uint8 and p.shape == (shape[0] // 4, shape[1])
    back = unpack_ternary(p)
    assert back.dtype == torch.int8
    assert torch.equal(back, codes)
    assert torch.equal(unpack_ternary(pack_ternary(codes.float())), codes)  # fp32 codes too


def test_pack_layout_matches_the_documented_bits():
    """Row i, i+R, i+2R, i+3R at bit offsets 0, 2, 4, 6, each as value + 1 (HF bitnet layout)."""
    codes = torch.tensor([[-1], [0], [1], [1], [0], [-1], [1], [0]], dtype=torch.int8)  # R = 2
    p = pack_ternary(codes)
    # byte 0: rows 0, 2, 4, 6 = -1, 1, 0, 1 -> fields 0, 2, 1, 2
    assert p[0, 0].item() == 0 | 2 << 2 | 1 << 4 | 2 << 6
    # byte 1: rows 1, 3, 5, 7 = 0, 1, -1, 0 -> fields 1, 2, 0, 1
    assert p[1, 0].item() == 1 | 2 << 2 | 0 << 4 | 1 << 6


@pytest.mark.parametrize("out", [1, 6, 10])
def test_out_features_not_multiple_of_4_is_refused(out):
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(out, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        PackedBitLinear.from_bitlinear(BitLinear(8, out))


def test_non_ternary_codes_are_refused():
    with pytest.raises(ValueError, match="codes in"):
        pack_ternary(torch.tensor([[2], [0], [0], [0]]))


# --- integer matmul -------------------------------------------------------------------------------

@pytest.mark.parametrize("mkn", [(1, 13, 7), (5, 16, 8), (17, 9, 3), (40, 64, 24)])
@pytest.mark.parametrize("mode", ["int_mm", "int_mm_padded", "int32"])
def test_int8_matmul_is_exact_on_every_path(mkn, mode):
    m, k, n = mkn
    g = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8).t()  # the layer's transposed view
    kw = {"int_mm": {}, "int_mm_padded": {"shapes": (17, 8, 8)}, "int32": {"use_int_mm": False}}[mode]
    out = int8_matmul(a, b, **kw)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, a.long() @ b.long())


# --- forward equals BitLinear ---------------------------------------------------------------------

KERNELS = ["onednn", "int_mm", "int32"]


def set_kernel(packed: PackedBitLinear, kernel: str) -> PackedBitLinear:
    """Pick the product path: oneDNN prepacked (skipped where unavailable), _int_mm, exact int32."""
    if kernel == "onednn" and not packed_mod.onednn_available():
        pytest.skip("oneDNN int8 kernels are not available here")
    packed.use_onednn = kernel == "onednn"
    packed.use_int_mm = kernel != "int32"
    return packed


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kn,lead", [((64, 32), (3, 5)), ((256, 128), (1,)), ((33, 20), (17,)),
                                     ((128, 64), (2, 40)), ((64, 32), (0,))])
def test_forward_equals_bitlinear_fp32(kn, lead, kernel):
    """Integer path: within 3 fp32 roundings (2.5e-7 relative) of the exact fp64 value; BitLinear's
    fp32 matmul accumulates its own round-off, so against it the bound is 1e-5 of sum |terms|."""
    k, n = kn
    layer = _layer(k, n, seed=k + n)
    packed = set_kernel(PackedBitLinear.from_bitlinear(layer), kernel)
    torch.manual_seed(1)
    x = torch.randn(*lead, k) * 3
    with torch.no_grad():
        y, ref = packed(x), layer(x)
    assert y.dtype == x.dtype and y.shape == (*lead, n)
    exact = _exact(x, layer)
    torch.testing.assert_close(y.double(), exact, rtol=2.5e-7, atol=0)
    xc, s = quantize_activation(x)
    wc, gamma = quantize_weight(layer.weight)
    bound = 1e-5 * (xc.abs() @ wc.abs().t()) * gamma / s
    assert ((y - ref).abs() <= bound).all()


def test_forward_under_bf16_autocast_matches_bitlinear():
    """Under bf16 autocast the packed layer still computes in integers (fp32 output, exact to
    2.5e-7); BitLinear's bf16 matmul is within bf16 round-off: 2**-7 of sum |terms|."""
    layer = _layer(256, 64, seed=3)
    packed = PackedBitLinear.from_bitlinear(layer)
    torch.manual_seed(4)
    x = torch.randn(4, 9, 256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = packed(x), layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _exact(x, layer), rtol=2.5e-7, atol=0)
    xc, s = quantize_activation(x)
    wc, gamma = quantize_weight(layer.weight)
    bound = 2.0 ** -7 * (xc.abs() @ wc.abs().t()) * gamma / s
    assert ((y - ref.float()).abs() <= bound).all()
    # a bf16 input gives a bf16 output: the exact value rounded to bf16 (within one bf16 ulp)
    yb = packed(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), _exact(x.bfloat16(), layer), rtol=2.0 ** -8, atol=0)


def test_padded_int_mm_path_in_the_layer(monkeypatch):
    """The CUDA shape rules (M > 16, K and N multiples of 8) applied on CPU give the same output."""
    layer = _layer(33, 20, seed=5)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(3, 33)
    plain = packed(x)
    monkeypatch.setitem(packed_mod.INT_MM_SHAPES, "cpu", (17, 8, 8))
    assert torch.equal(packed(x), plain)
    torch.testing.assert_close(plain.double(), _exact(x, layer), rtol=2.5e-7, atol=0)


def test_plain_bias_free_linear_packs_the_bitlinear_way():
    torch.manual_seed(6)
    lin = nn.Linear(48, 16, bias=False)
    x = torch.randn(7, 48)
    with torch.no_grad():
        y, ref = PackedBitLinear.from_bitlinear(lin)(x), BitLinear.from_linear(lin)(x)
    torch.testing.assert_close(y.double(), _exact(x, lin), rtol=2.5e-7, atol=0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


# --- storage --------------------------------------------------------------------------------------

def test_state_dict_is_one_sixteenth_of_fp32_and_round_trips():
    layer = _layer(128, 96, seed=7)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(5, 128)
    y = packed(x)  # fills the int8 cache, which must not be saved
    sd = packed.state_dict()
    assert set(sd) == {"packed", "weight_scale"}
    fp32_bytes = layer.weight.numel() * 4
    assert sd["packed"].numel() * sd["packed"].element_size() * 16 == fp32_bytes
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].numel() == 1
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert total == fp32_bytes // 16 + 4
    fresh = PackedBitLinear(128, 96)
    fresh(x)  # a stale cache from the blank weights must be dropped by load_state_dict
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)


# --- no unpacking per forward ---------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_unpacks_once_and_reuses_the_cached_weight(monkeypatch, kernel):
    calls = []
    real = packed_mod.unpack_ternary

    def counting(p):
        calls.append(1)
        return real(p)

    monkeypatch.setattr(packed_mod, "unpack_ternary", counting)
    packed = set_kernel(PackedBitLinear.from_bitlinear(_layer(64, 32, seed=8)), kernel)
    x = torch.randn(4, 64)
    first = packed(x)
    weight = next(iter(packed._kernels.values()))[1][0]
    if kernel != "onednn":
        assert packed.codes.dtype == torch.int8 and weight is packed.codes
    else:
        assert packed.codes is None  # only the prepacked weight is kept
    for _ in range(3):
        assert torch.equal(packed(x), first)
    assert len(calls) == 1
    assert next(iter(packed._kernels.values()))[1][0] is weight
    # new codes written in place (a state dict copied in, a bug planted) are picked up
    packed.packed.copy_(pack_ternary(-real(packed.packed)))
    assert torch.equal(packed(x), -first)
    assert len(calls) == 2


# --- errors ---------------------------------------------------------------------------------------

def test_bad_inputs_are_one_clear_value_error():
    packed = PackedBitLinear.from_bitlinear(_layer(32, 8))
    with pytest.raises(ValueError, match="input has 31 features, this layer takes 32"):
        packed(torch.randn(2, 31))
    with pytest.raises(ValueError, match="bias"):
        PackedBitLinear.from_bitlinear(nn.Linear(32, 8, bias=True))
    warm = _layer(32, 8)
    warm.quant_strength = 0.5
    with pytest.raises(ValueError, match="quant_strength"):
        PackedBitLinear.from_bitlinear(warm)


def test_casting_the_module_keeps_the_scale_fp32():
    """``model.to(torch.bfloat16)`` must not round gamma to bf16 (8 bits of mantissa)."""
    torch.manual_seed(0)
    layer = BitLinear(64, 32)
    packed = PackedBitLinear.from_bitlinear(layer)
    gamma = packed.weight_scale.clone()
    assert gamma.item() != gamma.bfloat16().float().item()  # a cast would change it
    for dtype in (torch.bfloat16, torch.float16):
        cast = PackedBitLinear.from_bitlinear(layer).to(dtype)
        assert cast.weight_scale.dtype == torch.float32 and torch.equal(cast.weight_scale, gamma)
        assert cast.packed.dtype == torch.uint8 and torch.equal(cast.packed, packed.packed)
        x = torch.randn(3, 64)
        assert torch.equal(cast(x.to(dtype)), packed(x.to(dtype)))

"""PackedBitLinear.fused_forward: q/k/v or gate/up as one product over concatenated codes, equal to
separate calls bit for bit, with one scale per original projection; the cache is built once and
follows changes to any layer."""

from __future__ import annotations

import pytest
import torch

import hyperbit.nn.packed as packed_mod
from hyperbit.nn.bitlinear import BitLinear
from hyperbit.nn.packed import PackedBitLinear

KERNELS = ["onednn", "int_mm", "int32"]


def _layers(k: int, outs: tuple[int, ...], kernel: str, seed: int = 0) -> list[PackedBitLinear]:
    if kernel == "onednn" and not packed_mod.onednn_available():
        pytest.skip("oneDNN int8 kernels are not available here")
    torch.manual_seed(seed)
    layers = []
    for i, n in enumerate(outs):
        bit = BitLinear(k, n)
        with torch.no_grad():
            bit.weight.mul_(1.0 + i)  # a different gamma per projection
        p = PackedBitLinear.from_bitlinear(bit)
        p.use_onednn, p.use_int_mm = kernel == "onednn", kernel != "int32"
        layers.append(p)
    return layers


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lead", [(1,), (2, 7), (40,)])
def test_fused_equals_separate_calls_bit_for_bit(kernel, lead):
    layers = _layers(64, (64, 16, 16), kernel)  # q, k, v of a GQA attention
    assert len({m.weight_scale.item() for m in layers}) == 3
    x = torch.randn(*lead, 64) * 2
    fused = PackedBitLinear.fused_forward(layers, x)
    assert len(fused) == 3
    for layer, y in zip(layers, fused):
        assert y.shape == (*lead, layer.out_features) and y.dtype == x.dtype
        assert torch.equal(y, layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_in_low_precision_and_under_autocast(dtype):
    layers = _layers(32, (48, 48), "int_mm" if not packed_mod.onednn_available() else "onednn")
    x = torch.randn(3, 5, 32).to(dtype)
    for y, layer in zip(PackedBitLinear.fused_forward(layers, x), layers):
        assert y.dtype == dtype and torch.equal(y, layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa = torch.randn(4, 32)
        for y, layer in zip(PackedBitLinear.fused_forward(layers, xa), layers):
            assert torch.equal(y, layer(xa))


@pytest.mark.parametrize("kernel", KERNELS)
def test_concatenation_is_cached_once_and_rebuilt_when_a_layer_changes(monkeypatch, kernel):
    layers = _layers(32, (16, 16), kernel, seed=1)
    x = torch.randn(3, 32)
    calls = []
    real = packed_mod.unpack_ternary
    monkeypatch.setattr(packed_mod, "unpack_ternary", lambda p: calls.append(1) or real(p))
    first = PackedBitLinear.fused_forward(layers, x)
    assert len(calls) == 2  # each layer's codes, once, into one concatenation
    for _ in range(3):
        again = PackedBitLinear.fused_forward(layers, x)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(calls) == 2
    with torch.no_grad():  # the second projection's scale changes: the cache must follow
        layers[1].weight_scale.mul_(2)
    after = PackedBitLinear.fused_forward(layers, x)
    assert torch.equal(after[0], first[0]) and torch.equal(after[1], layers[1](x))
    assert torch.allclose(after[1], 2 * first[1], rtol=1e-6, atol=0)


def test_fused_refuses_layers_of_different_widths():
    a, b = _layers(32, (16,), "int32")[0], _layers(48, (16,), "int32")[0]
    with pytest.raises(ValueError, match="one in_features"):
        PackedBitLinear.fused_forward([a, b], torch.randn(2, 32))
    with pytest.raises(ValueError, match="input has 31 features"):
        PackedBitLinear.fused_forward([a], torch.randn(2, 31))

"""PackedExpertLinear: BitNet experts as packed 2-bit codes, equal to the latent experts."""

from __future__ import annotations

import pytest
import torch

from hyperbit.nn.moe import ExpertLinear, quantize_expert_weight
from hyperbit.nn.packed import unpack_ternary
from hyperbit.nn.packed_moe import PackedExpertLinear


def _experts(out=64, seed=0):
    torch.manual_seed(seed)
    layer = ExpertLinear(4, 32, out, "bitnet")
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.5, 2.0, 4).view(-1, 1, 1))  # a different scale per expert
    return layer


def test_the_state_is_codes_and_one_scale_per_expert():
    layer = _experts()
    packed = PackedExpertLinear.from_expert_linear(layer)
    state = packed.state_dict()
    assert set(state) == {"packed", "weight_scale"}
    assert state["packed"].dtype == torch.uint8 and state["packed"].shape == (4, 16, 32)
    assert state["packed"].numel() * 16 == layer.weight.numel() * 4  # 1/16 of the fp32 bytes
    codes, gamma = quantize_expert_weight(layer.weight)
    assert torch.equal(torch.stack([unpack_ternary(p) for p in state["packed"]]).float(), codes)
    assert torch.equal(state["weight_scale"], gamma.view(-1)) and len(set(gamma.view(-1).tolist())) == 4


@pytest.mark.parametrize("sizes", [[5, 0, 9, 6], [0, 0, 20, 0]])
def test_forward_equals_the_latent_experts(sizes):
    """To fp32 round-off (the latent layer rounds the partial sums of a float product; this one
    sums the integer codes exactly), empty experts included."""
    layer = _experts()
    packed = PackedExpertLinear.from_expert_linear(layer)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = layer(x, sizes), packed(x, sizes)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_fused_forward_equals_separate_calls_bit_for_bit():
    gate, up = (PackedExpertLinear.from_expert_linear(_experts(seed=s)) for s in (0, 1))
    x, sizes = torch.randn(12, 32), [3, 4, 0, 5]
    fused = PackedExpertLinear.fused_forward([gate, up], x, sizes)
    assert torch.equal(fused, torch.cat([gate(x, sizes), up(x, sizes)], dim=-1))


def test_under_autocast_the_result_is_in_the_autocast_dtype():
    layer = _experts()
    packed = PackedExpertLinear.from_expert_linear(layer)
    x, sizes = torch.randn(8, 32), [2, 2, 2, 2]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = layer(x, sizes), packed(x, sizes)
    assert got.dtype == want.dtype == torch.bfloat16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 0.02


def test_refuses_full_precision_experts_and_widths_not_a_multiple_of_four():
    with pytest.raises(ValueError, match="full-precision"):
        PackedExpertLinear.from_expert_linear(ExpertLinear(2, 8, 8, "fp"))
    with pytest.raises(ValueError, match="multiple of 4"):
        PackedExpertLinear(2, 8, 6)


def test_a_cast_keeps_the_scales_fp32_and_a_load_drops_the_cached_codes():
    packed = PackedExpertLinear.from_expert_linear(_experts())
    x, sizes = torch.randn(4, 32), [1, 1, 1, 1]
    before = packed(x, sizes)
    assert packed.codes is not None
    packed.to(torch.bfloat16)
    assert packed.weight_scale.dtype == torch.float32 and packed.codes is None
    other = PackedExpertLinear.from_expert_linear(_experts(seed=3))
    packed.load_state_dict(other.state_dict())
    assert packed.codes is None
    assert torch.equal(packed(x, sizes), other(x, sizes)) and not torch.equal(packed(x, sizes), before)

"""KV-cache decoding on a GPU: cached equals uncached (greedy and sampled with a CUDA generator),
and float64 decoding on the GPU equals the CPU's."""

from __future__ import annotations

import pytest
import torch

import hyperbit as hb
from hyperbit.models import generate, generate_with_logits

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PATHWAYS = {"prenorm": dict(pathway="prenorm"),
            "hc-dynamic-4": dict(pathway="hc", expansion_rate=4, hc_dynamic=True),
            "hc-static-2": dict(pathway="hc", expansion_rate=2, hc_dynamic=False)}


def _model(dtype=torch.float32, device="cuda", max_seq_len: int = 64, **kw) -> hb.TransformerLM:
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=max_seq_len, **kw)
    torch.manual_seed(0)
    model = hb.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights, drawn on the CPU: the same model on every device
        for name, p in model.named_parameters():
            if name.endswith("dynamic_alpha_scale") or name.endswith("dynamic_beta_scale"):
                p.fill_(0.5)
            elif "static_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and "dynamic_" not in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.to(device=device, dtype=dtype)


def _prompt(device="cuda") -> torch.Tensor:
    return torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("name", list(PATHWAYS))
def test_greedy_cached_equals_uncached(name):
    model = _model(**PATHWAYS[name])
    cached, logits_c = generate_with_logits(model, _prompt(), 24, temperature=0)
    full, logits_f = generate_with_logits(model, _prompt(), 24, temperature=0, use_cache=False)
    assert cached.device.type == "cuda" and torch.equal(cached, full)
    assert len(set(cached[:, 5:].flatten().tolist())) > 2, "degenerate model: test would be weak"
    torch.testing.assert_close(logits_c, logits_f, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(PATHWAYS))
def test_sampling_cached_equals_uncached_with_a_cuda_generator(name):
    model = _model(**PATHWAYS[name])
    kw = dict(temperature=1.3, top_k=20, top_p=0.95)
    a = generate(model, _prompt(), 24, generator=torch.Generator("cuda").manual_seed(7), **kw)
    b = generate(model, _prompt(), 24, generator=torch.Generator("cuda").manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(PATHWAYS))
def test_float64_decoding_equals_the_cpu_past_the_context(name):
    """Past max_seq_len (16) both read the same sliding window; in float64 the GPU and the CPU
    agree to rounding."""
    gpu = _model(torch.float64, "cuda", max_seq_len=16, **PATHWAYS[name])
    cpu = _model(torch.float64, "cpu", max_seq_len=16, **PATHWAYS[name])
    out_g, logits_g = generate_with_logits(gpu, _prompt(), 40, temperature=0)
    out_c, logits_c = generate_with_logits(cpu, _prompt("cpu"), 40, temperature=0)
    assert torch.equal(out_g.cpu(), out_c)
    torch.testing.assert_close(logits_g.cpu(), logits_c, rtol=0, atol=1e-9)


def test_cached_decoding_under_bf16_autocast_follows_fp32():
    """What ``hyperbit generate`` runs on a GPU (bf16 autocast): the cached logits stay within
    bf16 precision of one fp32 forward over the same tokens. (Tokens are not compared: in bf16
    the cached and uncached matmul shapes round differently, which can flip a near tie.)"""
    model = _model(**PATHWAYS["hc-dynamic-4"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cached, logits_c = generate_with_logits(model, _prompt(), 8, temperature=0)
    with torch.no_grad():  # fp32: one forward over the same tokens
        logits_fp32 = model(cached[:, :-1])[0][:, 4:]
    assert logits_c.shape == logits_fp32.shape
    assert (logits_c.float() - logits_fp32).abs().max() < 0.1 * logits_fp32.abs().max()

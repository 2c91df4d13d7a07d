"""KV-cache decoding: the cached path must reproduce the full-recompute reference exactly
(tokens) and to 1e-5 (logits), for every pathway and for BitNet linears, and past the context,
where both read the same sliding window (checked against the documented window rule, forward by
forward); sampling filters must keep exactly the tokens they promise.

The 1e-5 logit check runs in float64. In float32 the two paths differ by float rounding alone
(different matmul / SDPA shapes: ~1e-5 on logits of size ~4), and with BitNet linears such a
1e-7 difference can flip one int8 activation rounding (a logit change of ~1e-2) - a property of
quantisation, not of the cache. float32 is checked separately at 1e-4 for full-precision linears.
"""

from __future__ import annotations

import math

import pytest
import torch

import hyperbit as hb
from hyperbit.models import KVCache, filter_logits, generate, generate_with_logits

torch.set_default_dtype(torch.float32)

PATHWAYS = {
    "prenorm": dict(pathway="prenorm"),
    "postnorm": dict(pathway="postnorm"),
    "hc-static-2": dict(pathway="hc", expansion_rate=2, hc_dynamic=False),
    "hc-dynamic-4": dict(pathway="hc", expansion_rate=4, hc_dynamic=True),
    "sequential": dict(pathway="sequential", expansion_rate=2),
    "parallel-2": dict(pathway="parallel", expansion_rate=2),
}
ATOL = 1e-5


def tiny_model(linear: str = "fp", seed: int = 0, dtype=torch.float32, max_seq_len: int = 64,
               **kw) -> hb.TransformerLM:
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=max_seq_len, linear=linear, **kw)
    torch.manual_seed(seed)
    model = hb.build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial weights: random gains, larger matrices, live HC weights
        for name, p in model.named_parameters():
            if name.endswith("dynamic_alpha_scale") or name.endswith("dynamic_beta_scale"):
                p.fill_(0.5)
            elif "static_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and "dynamic_" not in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def prompt(B: int = 2, T: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


CASES = [(name, linear) for linear in ("fp", "bitnet") for name in PATHWAYS]


def check_greedy(model, atol):
    p = prompt()
    cached, logits_c = generate_with_logits(model, p, 16, temperature=0)
    full, logits_f = generate_with_logits(model, p, 16, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    assert cached.shape == (2, 21) and torch.equal(cached[:, :5], p)
    assert len(set(cached[:, 5:].flatten().tolist())) > 2, "degenerate model: test would be weak"
    torch.testing.assert_close(logits_c, logits_f, rtol=0, atol=atol)
    # independently of generate: one full forward over the final sequence
    with torch.no_grad():
        ref, _ = model(cached[:, :-1])
    torch.testing.assert_close(logits_c, ref[:, 4:].float(), rtol=0, atol=atol)


@pytest.mark.parametrize("name,linear", CASES)
def test_greedy_cached_equals_uncached(name, linear):
    check_greedy(tiny_model(linear, dtype=torch.float64, **PATHWAYS[name]), ATOL)


@pytest.mark.parametrize("name", list(PATHWAYS))
def test_greedy_cached_equals_uncached_fp32(name):
    check_greedy(tiny_model("fp", **PATHWAYS[name]), 1e-4)


@pytest.mark.parametrize("name", list(PATHWAYS))
def test_sampling_cached_equals_uncached(name):
    model = tiny_model(**PATHWAYS[name])
    p = prompt(seed=3)
    kw = dict(temperature=1.3, top_k=20, top_p=0.95)
    a = generate(model, p, 16, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, p, 16, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], p)


def test_chunked_prefill_matches_full_forward():
    """A chunk of T > 1 tokens after cached ones needs the bottom-right causal mask."""
    model = tiny_model(dtype=torch.float64, **PATHWAYS["hc-dynamic-4"]).eval()
    idx = prompt(T=12, seed=4)
    with torch.no_grad():
        ref, _ = model(idx)
        cache = model.make_cache(12)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 12))]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, rtol=0, atol=ATOL)
    with pytest.raises(ValueError):
        with torch.no_grad():
            model(idx[:, :1], cache=cache)  # cache full


def test_top_k_1_equals_greedy():
    model = tiny_model(**PATHWAYS["prenorm"])
    p = prompt(seed=5)
    greedy = generate(model, p, 16, temperature=0)
    topk1 = generate(model, p, 16, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(topk1, greedy)


def kept(logits, **kw):
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in filter_logits(logits, **kw)]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15],
                          [0.20, 0.20, 0.20, 0.20, 0.20],
                          [0.01, 0.01, 0.01, 0.01, 0.96]])
    logits = probs.log() + 3.0  # any shift: softmax gives probs back
    assert kept(logits[:1], top_p=0.01) == [[1]]  # the top token is always kept
    assert kept(logits[:1], top_p=0.35) == [[1]]
    assert kept(logits[:1], top_p=0.5) == [[1, 3]]  # 0.4 < 0.5 <= 0.7
    assert kept(logits[:1], top_p=0.75) == [[1, 3, 4]]  # 0.7 < 0.75 <= 0.85
    assert kept(logits[:1], top_p=0.9) == [[1, 2, 3, 4]]  # 0.85 < 0.9 <= 0.95
    assert kept(logits[:1], top_p=0.97) == [[0, 1, 2, 3, 4]]
    assert kept(logits[:1], top_p=1.0) == [[0, 1, 2, 3, 4]]
    assert kept(logits, top_p=0.5)[2] == [4]  # per row
    assert len(kept(logits, top_p=0.5)[1]) == 3  # uniform: 3 x 0.2 is the first mass >= 0.5
    assert kept(logits, top_p=0.5)[0] == [1, 3]
    # top-k first, then top-p on the renormalised rest: top-2 = {1: 4/7, 3: 3/7}
    assert kept(logits[:1], top_k=2, top_p=0.5) == [[1]]
    assert kept(logits[:1], top_k=2, top_p=0.6) == [[1, 3]]
    assert kept(logits[:1], top_k=3) == [[1, 3, 4]]
    assert torch.equal(filter_logits(logits), logits)  # no filter: unchanged


def test_top_p_sampling_stays_in_nucleus():
    probs = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    logits = probs.log().expand(4000, 5)
    from hyperbit.models import sample_next
    tok = sample_next(logits, 1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tok, minlength=5)
    assert counts[0] == 0 and counts[2] == 0
    assert math.isclose(counts[1] / 4000, 0.40 / 0.85, abs_tol=0.04)


# --- past the context: a sliding window -----------------------------------------------------------
C = 16  # the context of the models below; the window moves on by C // 2 = 8 tokens


def expected_window_starts(prompt_len: int, steps: int, context: int = C) -> list[int]:
    """The first position the model sees at each step, by the documented rule: a long prompt is
    read from its last `context` tokens; a full window moves on by half a context."""
    start, starts = max(0, prompt_len - context), []
    for length in range(prompt_len, prompt_len + steps):
        while length - start > context:
            start += context // 2
        starts.append(start)
    return starts


class CountingModel(torch.nn.Module):
    """Passes everything through to the model, counting the tokens it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.tokens = model, model.cfg, 0

    def make_cache(self, max_len=None):
        return self.model.make_cache(max_len)

    def forward(self, idx, targets=None, **kw):
        self.tokens += idx.numel()
        return self.model(idx, targets, **kw)


@pytest.mark.parametrize("name,dtype,atol", [("prenorm", torch.float64, ATOL),
                                             ("hc-dynamic-4", torch.float64, ATOL),
                                             ("hc-dynamic-4", torch.float32, 1e-4)])
def test_greedy_cached_equals_uncached_past_the_context(name, dtype, atol):
    model = tiny_model(dtype=dtype, max_seq_len=C, **PATHWAYS[name])
    p = prompt(T=5)
    steps = 3 * C  # the window moves on 5 times
    cached, logits_c = generate_with_logits(model, p, steps, temperature=0)
    full, logits_f = generate_with_logits(model, p, steps, temperature=0, use_cache=False)
    assert cached.shape == (2, 5 + steps) and torch.equal(cached[:, :5], p)
    assert torch.equal(cached, full)
    assert len(set(cached[:, 5 + C:].flatten().tolist())) > 2, "degenerate model: test would be weak"
    torch.testing.assert_close(logits_c, logits_f, rtol=0, atol=atol)
    # independently of generate: each step's logits are one forward over the documented window
    starts = expected_window_starts(5, steps)
    assert sorted(set(starts)) == [0, 8, 16, 24, 32, 40]
    with torch.no_grad():
        for i, start in enumerate(starts):
            ref = model(cached[:, start:5 + i])[0][:, -1].float()
            torch.testing.assert_close(logits_c[:, i], ref, rtol=0, atol=atol)
    # the window moves on by C // 2 at once: one sliding by a token would read other context
    i = C + 1 - 5  # the first step whose window is over-full (length C + 1) and moves on
    assert starts[i] == C // 2
    with torch.no_grad():
        sliding_by_one = model(cached[:, 1:5 + i])[0][:, -1].float()
    assert (logits_c[:, i] - sliding_by_one).abs().max() > 1e-3


def test_sampling_cached_equals_uncached_past_the_context():
    model = tiny_model(max_seq_len=C, **PATHWAYS["hc-static-2"])
    kw = dict(temperature=1.3, top_k=20, top_p=0.95)
    a = generate(model, prompt(seed=3), 3 * C, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, prompt(seed=3), 3 * C, generator=torch.Generator().manual_seed(7),
                 use_cache=False, **kw)
    assert a.shape == (2, 5 + 3 * C) and torch.equal(a, b)


def test_prompt_longer_than_the_context_is_read_from_its_last_tokens():
    model = tiny_model(dtype=torch.float64, max_seq_len=C, **PATHWAYS["hc-dynamic-4"])
    p = prompt(T=2 * C + 8, seed=9)
    out, logits = generate_with_logits(model, p, 20, temperature=0)
    assert out.shape == (2, 2 * C + 28) and torch.equal(out[:, :2 * C + 8], p)  # the whole prompt
    assert torch.equal(out, generate(model, p, 20, temperature=0, use_cache=False))
    with torch.no_grad():
        torch.testing.assert_close(logits[:, 0], model(p[:, -C:])[0][:, -1].float(), rtol=0, atol=ATOL)
    # the same windows as generating from the last C tokens alone
    assert torch.equal(out[:, 2 * C + 8:], generate(model, p[:, -C:], 20, temperature=0)[:, C:])
    starts = expected_window_starts(2 * C + 8, 20)
    with torch.no_grad():
        for i in (0, 1, 9, 19):
            ref = model(out[:, starts[i]:2 * C + 8 + i])[0][:, -1].float()
            torch.testing.assert_close(logits[:, i], ref, rtol=0, atol=ATOL)


def test_cached_decoding_past_the_context_stays_cheap():
    """One token a step, plus re-encoding the kept C / 2 + 1 tokens once every C / 2 steps; the
    uncached reference re-reads the whole window each step."""
    steps = 6 * C
    model = tiny_model(max_seq_len=C, **PATHWAYS["hc-static-2"])
    counted = CountingModel(model)
    out = generate(counted, prompt(B=1, T=5), steps, temperature=0)
    starts = expected_window_starts(5, steps)
    moves = sum(1 for a, b in zip(starts, starts[1:]) if a != b)
    assert moves == 11
    assert counted.tokens == 5 + (steps - 1) + moves * (C // 2)  # prompt, 1 a step, re-encodings
    uncached = CountingModel(model)
    assert torch.equal(generate(uncached, prompt(B=1, T=5), steps, temperature=0, use_cache=False), out)
    assert uncached.tokens > 5 * counted.tokens


def test_context_of_one_token():
    model = tiny_model(max_seq_len=1, **PATHWAYS["hc-dynamic-4"])
    out, logits = generate_with_logits(model, prompt(T=3), 6, temperature=0)
    assert torch.equal(out, generate(model, prompt(T=3), 6, temperature=0, use_cache=False))
    with torch.no_grad():
        for i in range(6):
            torch.testing.assert_close(logits[:, i], model(out[:, 2 + i:3 + i])[0][:, -1], rtol=0, atol=1e-5)


def test_batch_rows_equal_single_rows():
    model = tiny_model(**PATHWAYS["hc-dynamic-4"])
    p = prompt(seed=6)
    both = generate(model, p, 16, temperature=0)
    for i in range(2):
        assert torch.equal(both[i:i + 1], generate(model, p[i:i + 1], 16, temperature=0))


def test_training_flag_restored_and_no_grad():
    model = tiny_model().train()
    out = generate(model, prompt(), 3, temperature=0)
    assert model.training and not out.requires_grad
    model.eval()
    generate(model, prompt(), 3, temperature=0)
    assert not model.training


def test_stop_token_pads_and_stops():
    model = tiny_model()
    p = prompt(seed=8)
    free = generate(model, p, 12, temperature=0)
    stop = int(free[0, 7])  # row 0 emits it at step 2
    out = generate(model, p, 12, temperature=0, stop_token=stop)
    for row_out, row_free in zip(out, free):
        hits = (row_free[5:] == stop).nonzero()
        if len(hits):
            end = 5 + int(hits[0])
            assert torch.equal(row_out[:end + 1], row_free[:end + 1])
            assert bool((row_out[end:] == stop).all())
        else:
            assert torch.equal(row_out, row_free[:len(row_out)])
    if all((r[5:] == stop).any() for r in free):
        assert out.shape[1] < free.shape[1]  # every row finished: stopped early


def test_zero_new_tokens_and_cache_api():
    model = tiny_model()
    p = prompt()
    assert torch.equal(generate(model, p, 0), p)
    cache = model.make_cache()
    assert isinstance(cache, KVCache) and len(cache) == 2 and cache.pos == 0

"""Autoregressive decoding: greedy, temperature, top-k and nucleus (top-p) sampling, with a KV cache.

With ``use_cache=True`` (default) the prompt is run once to fill the model's :class:`KVCache`
and every later step feeds only the newest token; ``use_cache=False`` re-runs the whole window
each step (the slow reference the cached path is tested against).

Past the context (``C = cfg.max_seq_len``) the model reads a sliding window: it sees at most the
last C tokens. A prompt longer than C is read from its last C tokens (the returned sequence still
starts with the whole prompt). When the window is full and a token must be added, the window moves
on by ``S = max(1, C // 2)`` tokens: the kept tokens are re-encoded from position 0 into a fresh
KV cache, so cached decoding costs one token a step plus one re-encoding of ``C + 1 - S`` tokens
every S steps. The uncached reference reads exactly the same windows.

Sampling order per step (as in Hugging Face): logits / temperature -> top-k -> top-p -> sample.
``temperature=0`` is greedy (argmax), and ignores top-k / top-p.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["VocabMask", "filter_logits", "generate", "generate_with_logits", "sample_next",
           "window_stride"]


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Mask (set to ``-inf``) the logits outside the top-k and then outside the nucleus.

    ``logits: (..., V)``. ``top_k`` keeps the k largest (ties with the k-th are kept too).
    ``top_p`` keeps, per row, the smallest set of most-probable tokens whose total probability
    (of the distribution left after top-k, renormalised) is >= ``top_p``; the most probable token
    is always kept. Returns a new tensor; ``logits`` is not modified.
    """
    logits = logits.clone()
    neg_inf = float("-inf")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits.masked_fill_(logits < kth, neg_inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.double(), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        drop_sorted = before >= top_p  # token i is needed only while the mass before it is < p
        drop_sorted[..., 0] = False  # always keep the most probable token
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits.masked_fill_(drop, neg_inf)
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(model: nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None) -> None:
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        raise ValueError("prompt must be a (B, T0) LongTensor of token ids")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one token per row, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def window_stride(context: int) -> int:
    """How far the window moves on when it is full: half a context (at least one token)."""
    return max(1, context // 2)


def generate_with_logits(model: nn.Module, prompt: Tensor, max_new_tokens: int,
                         temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, generator: torch.Generator | None = None,
                         use_cache: bool = True, stop_token: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`generate`, also returning the raw (pre-temperature, fp32) logits each new token was
    chosen from: ``(B, new, V)``, step ``i`` being the model's prediction for token ``T0 + i``."""
    _check_args(model, prompt, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    seq = prompt.to(device)
    B, T0 = seq.shape
    step_logits: list[Tensor] = []
    if max_new_tokens == 0:
        return seq.clone(), torch.empty(B, 0, model.cfg.vocab_size, device=device)
    was_training = model.training
    model.eval()
    context = model.cfg.max_seq_len
    stride = window_stride(context)
    start = max(0, T0 - context)  # the window is seq[:, start:]; a long prompt: its last C tokens
    try:
        with torch.no_grad():
            cache = None  # the KV cache of the tokens in the window, once filled
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                if seq.shape[1] - start > context:  # full: move on (it grows one token a step)
                    start += stride
                    cache = None
                window = seq[:, start:]
                if not use_cache:
                    logits, _ = model(window)
                elif cache is None:  # (re-)encode the window from position 0
                    cache = model.make_cache(min(context, window.shape[1] + max_new_tokens - 1 - step))
                    logits, _ = model(window, cache=cache)
                else:
                    logits, _ = model(window[:, -1:], cache=cache)
                last = logits[:, -1, :].float()  # (B, V)
                step_logits.append(last)
                token = sample_next(last, temperature, top_k, top_p, generator)  # (B,)
                if stop_token is not None:
                    token = token.masked_fill(finished, stop_token)  # finished rows pad with it
                    finished |= token == stop_token
                seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
                if stop_token is not None and bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return seq, torch.stack(step_logits, dim=1)


def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             stop_token: int | None = None) -> Tensor:
    """Continue ``prompt: (B, T0)`` by up to ``max_new_tokens`` tokens -> ``(B, T0 + new)``.

    ``temperature=0`` is greedy; otherwise tokens are sampled (with ``generator`` if given) from
    ``softmax(logits / temperature)`` restricted by ``top_k`` / ``top_p`` (see
    :func:`filter_logits`). ``stop_token``: a row that emits it is finished and is padded with it
    afterwards; decoding stops early once every row has finished (so ``new`` may be smaller).
    There is no length limit: past ``model.cfg.max_seq_len`` tokens the model reads a sliding
    window (module docstring), and a longer prompt is read from its last ``max_seq_len`` tokens.
    Runs under ``torch.no_grad()`` in eval mode and restores the model's training flag.
    The result is on the model's device; the prompt is its prefix, unchanged.
    """
    return generate_with_logits(model, prompt, max_new_tokens, temperature, top_k, top_p,
                                generator, use_cache, stop_token)[0]


class VocabMask(nn.Module):
    """Wraps a language model so that logits of ids ``>= vocab`` (embedding rows no tokenizer id
    maps to) are ``-inf``: generation never picks them. Exposes ``cfg`` and ``make_cache`` like
    the model it wraps, so :func:`generate` accepts it."""

    def __init__(self, model: nn.Module, vocab: int):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.vocab = vocab

    def make_cache(self, max_len: int | None = None):
        return self.model.make_cache(max_len)

    def forward(self, idx: Tensor, targets: Tensor | None = None, **kwargs: Any):
        logits, loss = self.model(idx, targets, **kwargs)
        return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= self.vocab,
                                  float("-inf")), loss

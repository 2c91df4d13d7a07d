"""Models built from a :class:`~hyperbit.config.ModelConfig`, and decoding."""

from ..nn.attention import KVCache, LayerKVCache
from .generate import VocabMask, filter_logits, generate, generate_with_logits, sample_next
from .lm import Block, TransformerLM, build_model, count_params, pathway_params

__all__ = ["Block", "KVCache", "LayerKVCache", "TransformerLM", "VocabMask", "build_model",
           "count_params", "filter_logits", "generate", "generate_with_logits", "pathway_params",
           "sample_next"]

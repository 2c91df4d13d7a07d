from .generate import filter_logits, generate, generate_with_logits, sample_next
from .lm import Block, TransformerLM, build_model, count_params, pathway_params
from ..nn.attention import KVCache, LayerKVCache

__all__ = ["Block", "KVCache", "LayerKVCache", "TransformerLM", "build_model", "count_params",
           "filter_logits", "generate", "generate_with_logits", "pathway_params", "sample_next"]

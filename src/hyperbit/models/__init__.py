"""Models built from a :class:`~hyperbit.config.ModelConfig`, and decoding."""

from ..nn.attention import KVCache, LayerKVCache
from .fast import activation_checkpointing, compile_blocks, set_activation_checkpointing
from .generate import VocabMask, filter_logits, generate, generate_with_logits, sample_next
from .lm import Block, TransformerLM, count_params, pathway_params
from .vit import ViT, build_model

__all__ = ["Block", "KVCache", "activation_checkpointing", "compile_blocks",
           "set_activation_checkpointing", "LayerKVCache", "TransformerLM", "ViT", "VocabMask", "build_model",
           "count_params", "filter_logits", "generate", "generate_with_logits", "pathway_params",
           "sample_next"]

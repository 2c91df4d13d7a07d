"""``HyperbitConfig``: a hyperbit :class:`~hyperbit.config.ModelConfig` as a Hugging Face config.

Imports ``transformers`` (its configuration module only, not the modelling code): import this
module lazily (:mod:`.hf_register` does, when ``transformers``' Auto classes are first imported).
The ModelConfig is held whole, resolved, under ``hyperbit`` in ``config.json``; the usual Hugging
Face names (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...) are derived from it on
every load, so the two can never disagree.
"""

from __future__ import annotations

from typing import Any

try:  # transformers >= 5 spells it PreTrainedConfig; 4.x PretrainedConfig
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

from ..config import ModelConfig

MODEL_TYPE = "hyperbit"
# Hugging Face names derived from the ModelConfig (ignored when given: the ModelConfig decides)
DERIVED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
           "tie_word_embeddings")

__all__ = ["HyperbitConfig", "MODEL_TYPE", "register_config"]


class HyperbitConfig(PreTrainedConfig):
    """``HyperbitConfig(hyperbit=model_config.to_dict(), **hugging_face_kwargs)``."""

    model_type = MODEL_TYPE

    def __init__(self, hyperbit: dict[str, Any] | None = None, **kwargs: Any):
        cfg = ModelConfig.from_dict(dict(hyperbit or {})).resolved()
        self.hyperbit = cfg.to_dict()
        for key in DERIVED:
            kwargs.pop(key, None)
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.dim
        self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
        self.num_key_value_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.intermediate_size, self.max_position_embeddings = cfg.ffn_hidden, cfg.max_seq_len
        self.rms_norm_eps = cfg.norm_eps
        self.tie_word_embeddings = cfg.tie_embeddings
        self.use_cache = bool(kwargs.pop("use_cache", True))
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.hyperbit))


def register_config() -> None:
    """``AutoConfig`` maps ``model_type: "hyperbit"`` to :class:`HyperbitConfig`."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, HyperbitConfig, exist_ok=True)

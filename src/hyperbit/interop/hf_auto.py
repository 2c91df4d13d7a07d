"""``HyperbitForCausalLM``: every hyperbit model (any pathway, fp or BitNet) as a Hugging Face
``PreTrainedModel`` with ``GenerationMixin``, and the ``hf`` export format.

The wrapped :class:`~hyperbit.models.TransformerLM` is ``self.model``; its parameters keep their
names under ``model.`` in ``model.safetensors``, so the computation is hyperbit's own, bit for bit.
``generate`` drives hyperbit's attention with the Hugging Face cache it creates (a
``DynamicCache``): each block's attention appends its keys and values to layer ``i`` of that cache
through :class:`_CacheView`, which has the interface of hyperbit's :class:`KVCache`. Padding is not
supported (a 2-D ``attention_mask`` with zeros is refused): batch prompts of equal length.

Imports ``transformers``' modelling code: import this module lazily (:mod:`.hf_register`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data import Tokenizer
from ..models import TransformerLM
from ..nn.rope import RotaryEmbedding
from ..pathways.manifold import permutation_matrices
from .hf_config import HyperbitConfig
from .hf_tokenizer import write_hf_tokenizer

# transformers 5 names the cache argument and output field ``cache``; 4.x ``past_key_values``
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["HyperbitForCausalLM", "register_model", "write_hf"]


class _LayerView:
    """One layer of a Hugging Face cache with the interface of hyperbit's ``LayerKVCache``."""

    def __init__(self, cache: Any, layer: int):
        self.cache, self.layer = cache, layer

    @property
    def pos(self) -> int:
        return int(self.cache.get_seq_length(self.layer))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k, v, self.layer)


class _CacheView:
    """A Hugging Face cache as hyperbit's ``KVCache`` (``len``, ``layers``, ``pos``)."""

    def __init__(self, cache: Any, n_layers: int):
        self.layers = [_LayerView(cache, i) for i in range(n_layers)]

    @property
    def pos(self) -> int:
        return self.layers[0].pos

    def __len__(self) -> int:
        return len(self.layers)


def rebuild_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers (RoPE tables, mHC permutation matrices): they are not
    stored, and a model built on the meta device (as ``from_pretrained`` builds it) lacks them."""
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            device = m.cos.device if not m.cos.is_meta else None
            m._build(max(m.cos.shape[0], 1), device)
        perms = getattr(m, "perms", None)
        if isinstance(perms, Tensor):
            m.perms = permutation_matrices(m.expansion_rate).to(
                device=None if perms.is_meta else perms.device)


class HyperbitForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyperbitConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # used when tie_word_embeddings
    _supports_cache_class = True

    def __init__(self, config: HyperbitConfig, model: TransformerLM | None = None):
        """``model``: wrap this TransformerLM (of ``config``'s model config) instead of a new one."""
        super().__init__(config)
        if model is None:
            try:
                model = TransformerLM(config.model_config())
            except RuntimeError:
                if torch.empty(0).device.type != "meta":
                    raise
                # from_pretrained builds on the meta device; a pathway whose constructor computes
                # with its tensors (mHC) is built on the CPU instead, then loaded as usual
                with torch.device("cpu"):
                    model = TransformerLM(config.model_config())
        self.model = model
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """TransformerLM initialises itself when built; loaded weights are never re-initialised."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "HyperbitForCausalLM":
        model = super().from_pretrained(*args, **kwargs)
        # transformers keeps tensors a constructor made fp32 explicitly (static hyper-connection
        # weights) in fp32 under dtype=bf16/fp16; hyperbit's model.to(dtype) casts every tensor
        model.model.to(model.model.embed.weight.dtype)
        rebuild_buffers(model)
        return model

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """``input_ids (B, T)`` -> logits ``(B, T, V)``; with ``labels`` the mean next-token
        cross-entropy (labels unshifted, -100 ignored, as Hugging Face models do). With a cache the
        tokens continue the cached sequence (positions follow the cache, ``position_ids`` unused)."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("HyperbitForCausalLM takes input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError("HyperbitForCausalLM does not support padding (an attention_mask with "
                             "zeros); batch prompts of equal length")
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        view = _CacheView(cache, len(self.model.blocks)) if cache is not None else None
        logits, _ = self.model(input_ids, cache=view)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


def register_model() -> None:
    """``AutoModelForCausalLM`` maps :class:`HyperbitConfig` to :class:`HyperbitForCausalLM`."""
    from transformers import AutoModelForCausalLM

    from .hf_config import register_config

    register_config()
    AutoModelForCausalLM.register(HyperbitConfig, HyperbitForCausalLM, exist_ok=True)


def to_hf(model: TransformerLM, tokenizer: Tokenizer | None = None) -> HyperbitForCausalLM:
    """``model`` wrapped (sharing its parameters, not copying them) as a :class:`HyperbitForCausalLM`."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    dtype = next(model.parameters()).dtype
    config = HyperbitConfig(hyperbit=model.cfg.to_dict(), eos_token_id=eot, bos_token_id=None,
                            pad_token_id=None, dtype=str(dtype).removeprefix("torch."),
                            architectures=["HyperbitForCausalLM"])
    hf = HyperbitForCausalLM(config, model=model)
    hf.generation_config.eos_token_id = eot
    return hf.eval() if not model.training else hf


def write_hf(model: TransformerLM, run_config, tokenizer: Tokenizer, info: dict[str, Any],
             out_dir: str | Path) -> None:
    """Writer of the ``hf`` export format: ``save_pretrained`` of :func:`to_hf` (``config.json``,
    ``model.safetensors``, ``generation_config.json``) and the tokenizer (:mod:`.hf_tokenizer`)."""
    register_model()
    hf = to_hf(model, tokenizer)
    hf.save_pretrained(out_dir)
    write_hf_tokenizer(tokenizer, out_dir, run_config.model.max_seq_len)

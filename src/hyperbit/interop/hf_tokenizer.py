"""Tokenizers in the Hugging Face directory layout, both ways, without importing ``transformers``.

Writing (:func:`write_hf_tokenizer`) puts two files next to a model::

    tokenizer.json          the ``tokenizers`` library's JSON: BPE as trained; the byte tokenizer
                            as a byte-level BPE with the 256 single-byte tokens (id = byte value,
                            GPT-2's byte-to-character alphabet) and no merges, so every byte is one
                            token with its own value as id
    tokenizer_config.json   ``{"tokenizer_class": "PreTrainedTokenizerFast", ...}`` (the end-of-text
                            token as ``eos_token`` when the tokenizer has one)

so ``AutoTokenizer.from_pretrained(dir)`` encodes text to the ids hyperbit's tokenizer gives.
Reading (:func:`read_hf_tokenizer`) turns a directory's ``tokenizer.json`` back into a hyperbit
tokenizer: the byte-level identity vocabulary above becomes a :class:`ByteTokenizer`, any other
BPE model a :class:`BPETokenizer`; other models (WordPiece, Unigram) are a DataError.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import BPETokenizer, ByteTokenizer, DataError, Tokenizer
from ..data.tokenizers import EOT, byte_level_alphabet

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

__all__ = ["TOKENIZER_CONFIG", "TOKENIZER_JSON", "byte_tokenizer_json", "read_hf_tokenizer",
           "write_hf_tokenizer"]


def byte_tokenizer_json() -> str:
    """The ``tokenizers`` JSON that encodes text exactly as :class:`ByteTokenizer` does."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = byte_level_alphabet()  # character -> byte value (= token id)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; returns their names."""
    if isinstance(tokenizer, ByteTokenizer):
        text = byte_tokenizer_json()
    elif isinstance(tokenizer, BPETokenizer):
        text = tokenizer.to_json()
    else:
        raise DataError(f"cannot write a {tokenizer.kind} tokenizer in the Hugging Face layout "
                        "(byte and bpe tokenizers only)")
    out_dir = Path(out_dir)
    (out_dir / TOKENIZER_JSON).write_text(text, encoding="utf-8")
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                    "clean_up_tokenization_spaces": False}
    if tokenizer.eot_id is not None:
        config["eos_token"] = EOT
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [TOKENIZER_JSON, TOKENIZER_CONFIG]


def _is_byte_identity(data: dict) -> bool:
    """Whether a ``tokenizers`` JSON is the byte tokenizer of :func:`byte_tokenizer_json`."""
    model = data.get("model") or {}
    return (model.get("type") == "BPE" and not model.get("merges") and not data.get("added_tokens")
            and model.get("vocab") == byte_level_alphabet()
            and (data.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
            and (data.get("decoder") or {}).get("type") == "ByteLevel"
            and not data.get("normalizer") and not data.get("post_processor"))


def read_hf_tokenizer(hf_dir: str | Path) -> Tokenizer | None:
    """The hyperbit tokenizer of a Hugging Face directory's ``tokenizer.json``; None when there is
    none. A file that is not a byte-level or BPE tokenizer is a DataError."""
    path = Path(hf_dir) / TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable tokenizer JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a tokenizer file must hold a JSON object")
    if _is_byte_identity(data):
        return ByteTokenizer()
    kind = (data.get("model") or {}).get("type") if isinstance(data.get("model"), dict) else None
    if kind != "BPE":
        raise DataError(f"{path}: tokenizer model {kind!r} is not supported; allowed: ['BPE'] "
                        "(or pass --tokenizer byte|FILE)")
    return BPETokenizer.from_json(text, where=str(path))

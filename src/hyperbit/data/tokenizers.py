"""Tokenizers with one small interface: ``encode``, ``decode``, ``vocab_size``, ``eot_id``,
``save``/``load`` (JSON files only, never pickle) and :func:`load_tokenizer`, which dispatches on
the saved JSON.

* :class:`ByteTokenizer`: the 256 UTF-8 byte values; no end-of-text token (documents in byte
  shards are separated by a blank line, ``"\\n\\n"``). Saved as ``{"kind": "byte", ...}``.
* :class:`BPETokenizer`: byte-level BPE trained locally with the ``tokenizers`` library (GPT-2
  style pre-tokenisation, every byte in the initial alphabet, so any text round-trips exactly).
  ``<|endoftext|>`` is reserved as a special token (id 0) and separates documents in BPE shards;
  a document that literally contains that string encodes it as the special token. Saved as the
  ``tokenizers`` library's own JSON, loadable by ``tokenizers.Tokenizer.from_file``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError

EOT = "<|endoftext|>"
BYTE_FORMAT_VERSION = 1


class Tokenizer:
    """The interface every tokenizer implements."""

    kind: str = "abstract"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token that separates documents, or None (byte tokenizer)."""
        return None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a saved tokenizer file, which must be of this class's kind."""
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise DataError(f"{path}: not a {cls.kind} tokenizer file (kind {tok.kind!r})")
        return tok


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids 0..255; decoding replaces invalid byte sequences with U+FFFD."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "replace"))  # "replace": lone surrogates become "?"

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return bytes(ids).decode("utf-8", errors="replace")
        except ValueError:
            raise DataError("byte tokenizer: token ids must be in 0..255") from None

    def save(self, path: str | Path) -> None:
        data = {"kind": "byte", "version": BYTE_FORMAT_VERSION, "vocab_size": 256}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer(Tokenizer):
    """Byte-level BPE (a wrapper around a ``tokenizers.Tokenizer``)."""

    kind = "bpe"

    def __init__(self, tok: Any):
        self._tok = tok

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Train on ``documents`` (any iterable of strings, consumed once). ``vocab_size`` counts
        the 256 byte tokens and ``<|endoftext|>``; the result can be smaller when the corpus has
        fewer mergeable pairs."""
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise DataError(f"BPE vocab_size must be an integer >= 257 (256 bytes + end-of-text), got {vocab_size!r}")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int | None:
        return self._tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str, where: str = "<string>") -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the Rust side raises a plain Exception
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}: not a valid tokenizers JSON file ({msg})") from None
        return cls(tok)


    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save`: ``{"kind": "byte"}`` files give a
    :class:`ByteTokenizer`, ``tokenizers`` JSON with a BPE model a :class:`BPETokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such tokenizer file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: tokenizer file is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: tokenizer file must hold a JSON object")
    if data.get("kind") == "byte":
        if data.get("vocab_size", 256) != 256 or data.get("version") != BYTE_FORMAT_VERSION:
            raise DataError(f"{path}: unsupported byte tokenizer file (version {data.get('version')!r})")
        return ByteTokenizer()
    model = data.get("model")
    if isinstance(model, dict) and model.get("type") == "BPE":
        return BPETokenizer.from_json(text, where=str(path))
    raise DataError(f"{path}: unknown tokenizer file (expected a byte tokenizer or a tokenizers BPE JSON)")


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (byte == byte; BPE: identical JSON)."""
    if a.kind != b.kind or a.vocab_size != b.vocab_size or a.eot_id != b.eot_id:
        return False
    if isinstance(a, ByteTokenizer):
        return True
    to_json_a, to_json_b = getattr(a, "to_json", None), getattr(b, "to_json", None)
    if to_json_a is None or to_json_b is None:
        return a == b
    return to_json_a() == to_json_b()

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

Bytes per token (:meth:`Tokenizer.token_bytes`, what bits per byte divides by): a table, computed
once per tokenizer, of how many bytes of the corpus each id stands for, so the bytes of any run of
ids -- a window that starts or ends inside a multi-byte character included -- are the sum of its
table entries, exactly. The byte tokenizer: 1 per id. Byte-level BPE: the number of bytes its
vocabulary string maps to (one byte per character of the byte-level alphabet). The end-of-text
token counts as the bytes of :data:`DOC_SEPARATOR`, the blank line byte shards hold in its place,
so a corpus counts the same bytes under either tokenizer and bits per byte compare across them
(a document that literally contains ``<|endoftext|>`` is the one exception: it is encoded as the
token). Other special tokens count 0 bytes; other added tokens the UTF-8 length of their text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import DataError

EOT = "<|endoftext|>"
DOC_SEPARATOR = "\n\n"  # separates documents in byte shards; the end-of-text token stands for it
BYTE_FORMAT_VERSION = 1


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``): character -> the byte it stands
    for. Printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


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

    def token_bytes(self) -> np.ndarray:
        """Bytes each id stands for (int64, length ``vocab_size``, read-only; see the module
        docstring), computed on the first call and kept."""
        table = self.__dict__.get("_token_bytes")
        if table is None:
            table = np.asarray(self._byte_lengths(), dtype=np.int64)
            table.flags.writeable = False
            self.__dict__["_token_bytes"] = table
        return table

    def _byte_lengths(self) -> np.ndarray:
        """Fallback for other tokenizers: each id decoded alone, the end-of-text token as the
        separator (exact only when every token decodes to whole characters)."""
        out = np.array([len(self.decode([i]).encode("utf-8")) for i in range(self.vocab_size)], dtype=np.int64)
        if self.eot_id is not None:
            out[self.eot_id] = len(DOC_SEPARATOR.encode("utf-8"))
        return out

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

    def _byte_lengths(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)  # the "\n\n" separator is two ordinary byte tokens

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

    def _byte_lengths(self) -> np.ndarray:
        """Byte-level vocabularies: the bytes each token string maps to; special tokens 0 (the
        end-of-text token: the separator's bytes); other added tokens their text's UTF-8 length.
        A vocabulary that is not byte-level falls back to decoding each token alone."""
        added = self._tok.get_added_tokens_decoder()
        alphabet = byte_level_alphabet() if _is_byte_level(json.loads(self.to_json())) else {}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in added:
                tok = added[i]
                out[i] = (len(DOC_SEPARATOR.encode("utf-8")) if i == self.eot_id
                          else 0 if tok.special else len(tok.content.encode("utf-8")))
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                continue  # an id the vocabulary does not use
            if alphabet and all(c in alphabet for c in token):
                out[i] = len(token)
            else:
                out[i] = len(self.decode([i]).encode("utf-8"))
        return out

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


def _is_byte_level(data: dict) -> bool:
    """Whether a ``tokenizers`` JSON decodes with the byte-level decoder (alone or in a sequence)."""
    dec = data.get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


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

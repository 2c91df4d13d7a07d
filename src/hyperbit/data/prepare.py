"""Tokenise a corpus once into a prepared directory of token shards (the format of
:mod:`hyperbit.data.shards`), from a corpus spec (:func:`prepare`) or from a run's data section
(:func:`prepare_data`).

The corpus is read document by document and written as it goes: shards are appended to, and
``meta.json`` is written last, so a directory interrupted half-way is never taken for a prepared one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import DataConfig
from .errors import DataError
from .shards import FORMAT, FORMAT_VERSION, META_FILE, TOKENIZER_FILE, token_dtype
from .sources import SPLITS, DecodeStats, Source, describe_source, is_val_document, iter_documents, parse_source
from .tokenizers import DOC_SEPARATOR, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

DEFAULT_SHARD_SIZE = 2**25  # tokens per shard file (64 MiB of uint16)
DEFAULT_BPE_VOCAB = 8192
_ENCODE_BATCH = 64  # documents per encode_batch call


def prepare_data(d: DataConfig, data_dir: str | Path, log: Callable[[str], None] = print) -> None:
    """Tokenise the corpus a run's data section describes into ``data_dir``, once (a directory
    that is already prepared is kept as it is)."""
    data_dir = Path(data_dir)
    if (data_dir / META_FILE).exists():
        return
    log(f"preparing data: {d.path} -> {data_dir} ({d.tokenizer} tokenizer)")
    prepare(d.path, data_dir, tokenizer=d.tokenizer,
            vocab_size=d.vocab_size if d.tokenizer == "bpe" else None, val_fraction=d.val_fraction,
            max_bytes=d.max_bytes or None, overwrite=True, text_field=d.text_field,
            decode_errors=d.decode_errors)


class _ShardWriter:
    """Appends token arrays to ``{split}_000.bin``, ``{split}_001.bin``, ... of at most
    ``shard_size`` tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_size: int):
        self.out_dir, self.split, self.dtype, self.shard_size = out_dir, split, dtype, shard_size
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0
        self._f = None

    def write(self, arr: np.ndarray) -> None:
        pos = 0
        while pos < len(arr):
            if self._f is None:
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self._f = open(self.out_dir / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
            cur = self.shards[-1]
            take = min(self.shard_size - cur["tokens"], len(arr) - pos)
            arr[pos:pos + take].astype(self.dtype.newbyteorder("<"), copy=False).tofile(self._f)
            cur["tokens"] += take
            self.tokens += take
            pos += take
            if cur["tokens"] == self.shard_size:
                self._f.close()
                self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _resolve_tokenizer(tokenizer: str | Path | Tokenizer, vocab_size: int | None, source: Source,
                       val_fraction: float, min_frequency: int) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer == "byte":
        if vocab_size not in (None, 256):
            raise DataError(f"the byte tokenizer has vocab_size 256, got vocab_size={vocab_size}")
        return ByteTokenizer()
    if tokenizer == "bpe":
        size = DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size
        split = "train" if source.kind == "pystdlib" or val_fraction > 0 else None
        docs = iter_documents(source, split=split, val_fraction=val_fraction)
        return BPETokenizer.train(docs, size, min_frequency=min_frequency)
    if isinstance(tokenizer, (str, Path)) and Path(tokenizer).is_file():
        tok = load_tokenizer(tokenizer)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise DataError(f"{tokenizer}: tokenizer has vocab_size {tok.vocab_size}, not {vocab_size}")
        return tok
    raise DataError(f"tokenizer={str(tokenizer)!r} is not 'byte', 'bpe' or an existing tokenizer file")


def _separator(tok: Tokenizer) -> tuple[np.ndarray, str]:
    if tok.eot_id is not None:
        return np.array([tok.eot_id], dtype=np.int64), "end-of-text token"
    return np.asarray(tok.encode(DOC_SEPARATOR), dtype=np.int64), DOC_SEPARATOR


def _encode_documents(tok: Tokenizer, docs: list[str], sep: np.ndarray) -> np.ndarray:
    """The documents' ids, each followed by the separator, as one int64 (or uint8) array."""
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer("".join(d + DOC_SEPARATOR for d in docs).encode("utf-8", "replace"), dtype=np.uint8)
    parts = []
    for ids in tok.encode_batch(docs):
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(sep)
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= tok.vocab_size):
        bad = int(arr.max() if arr.max() >= tok.vocab_size else arr.min())
        raise DataError(f"tokenizer produced id {bad} outside its vocabulary of {tok.vocab_size}")
    return arr


def prepare(source: str | Path | Source, out_dir: str | Path, *, tokenizer: str | Path | Tokenizer = "byte",
            vocab_size: int | None = None, val_fraction: float = 0.01, shard_size: int = DEFAULT_SHARD_SIZE,
            max_bytes: int | None = None, overwrite: bool = False, min_frequency: int = 2,
            **source_options: Any) -> dict[str, Any]:
    """Tokenise ``source`` once into shards under ``out_dir``; returns the written ``meta.json``.

    ``tokenizer``: ``"byte"``, ``"bpe"`` (trained here on the train split with ``vocab_size``,
    default 8192), a saved tokenizer file, or a :class:`Tokenizer`. ``val_fraction`` is the
    expected fraction of validation documents (ignored by pystdlib, which has its own split); with
    ``val_fraction > 0`` both splits must end up non-empty. ``max_bytes`` caps the source (per
    split for pystdlib). ``source_options`` go to :func:`parse_source` (``text_field``,
    ``pattern``, ``sample_by``, ``hf_split``, and ``decode_errors``: ``"strict"``, ``"replace"`` or
    ``"skip"`` for text that is not UTF-8; ``meta.json`` records what was replaced or skipped).
    An existing prepared directory is only replaced with ``overwrite=True``. Every input problem
    raises :class:`DataError`.
    """
    src = parse_source(source, max_bytes=max_bytes, **source_options)
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise DataError(f"shard_size must be a positive integer (tokens per shard), got {shard_size!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a directory: {out}")
    if (out / META_FILE).exists() and not overwrite:
        raise DataError(f"{out} already holds prepared shards; pass overwrite=True (--overwrite) to replace them")

    tok = _resolve_tokenizer(tokenizer, vocab_size, src, val_fraction, min_frequency)
    if tok.kind == "bpe" and tok.eot_id is None:
        raise DataError("the BPE tokenizer has no <|endoftext|> token to separate documents")
    dtype = token_dtype(tok.vocab_size)
    sep, sep_desc = _separator(tok)

    out.mkdir(parents=True, exist_ok=True)
    _remove_prepared(out)  # meta.json first: the directory is invalid until the new one is written
    writers = {split: _ShardWriter(out, split, dtype, shard_size) for split in SPLITS}
    decoding = DecodeStats()
    try:
        if src.kind == "pystdlib":
            streams = [(split, iter_documents(src, split=split, stats=decoding)) for split in SPLITS]
        else:
            streams = [(None, iter_documents(src, stats=decoding))]
        for fixed_split, docs in streams:
            pending: dict[str, list[str]] = {s: [] for s in SPLITS}
            for index, doc in enumerate(docs):
                split = fixed_split or ("val" if is_val_document(index, val_fraction) else "train")
                pending[split].append(doc)
                if len(pending[split]) >= _ENCODE_BATCH:
                    _flush(tok, writers[split], pending[split], sep)
            for split in SPLITS:
                _flush(tok, writers[split], pending[split], sep)
        for w in writers.values():
            w.close()
        if writers["train"].tokens == 0:
            raise DataError(f"empty corpus: the train split of {describe_source(src)} has no tokens")
        if (src.kind == "pystdlib" or val_fraction > 0) and writers["val"].tokens == 0:
            raise DataError(f"the validation split is empty ({writers['train'].documents} documents, "
                            f"val_fraction={val_fraction}); use more documents or val_fraction=0")
        tok.save(out / TOKENIZER_FILE)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer": {"kind": tok.kind, "file": TOKENIZER_FILE, "eot_id": tok.eot_id},
            "separator": {"kind": sep_desc, "ids": [int(i) for i in sep]},
            "source": src.describe(),
            "decode_errors": decoding.describe(src.decode_errors),
            "split_rule": ("pystdlib: crc32(relative path) % 50 == 0" if src.kind == "pystdlib"
                           else "blake2b(document index) / 2**64 < val_fraction"),
            "val_fraction": None if src.kind == "pystdlib" else val_fraction,
            "shard_size": shard_size,
            "documents": {s: writers[s].documents for s in SPLITS},
            "tokens": {s: writers[s].tokens for s in SPLITS},
            "shards": {s: writers[s].shards for s in SPLITS},
        }
        tmp = out / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out / META_FILE)
        return meta
    except BaseException:
        for w in writers.values():
            w.close()
        _remove_prepared(out)  # the tokenizer file is kept: it may be the one passed in
        raise


def _flush(tok: Tokenizer, writer: _ShardWriter, docs: list[str], sep: np.ndarray) -> None:
    if docs:
        writer.write(_encode_documents(tok, docs, sep))
        writer.documents += len(docs)
        docs.clear()


def _remove_prepared(out: Path) -> None:
    """Remove ``meta.json`` and the shard files (meta first, so the directory is never valid with
    stale or partial shards). ``tokenizer.json`` stays until it is overwritten."""
    for name in (META_FILE, META_FILE + ".tmp"):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        for p in out.glob(f"{split}_*.bin"):
            p.unlink()

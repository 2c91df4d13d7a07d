"""Token shards: the prepared-directory format, read as memory-mapped arrays (:class:`TokenShards`);
:mod:`hyperbit.data.prepare` writes it.

Layout of a prepared directory::

    meta.json         written last: a directory without it is not (completely) prepared
    tokenizer.json    the tokenizer (see :mod:`hyperbit.data.tokenizers`)
    train_000.bin ... raw little-endian token ids, numpy uint16 when vocab_size <= 65535,
    val_000.bin ...   else uint32; at most ``shard_size`` tokens per file

``meta.json`` records the format and its version, the dtype, vocab size, tokenizer (kind, file,
end-of-text id), the separator, the source, what ``decode_errors`` replaced or skipped of text that
is not UTF-8, the split rule, and per split the document count, the token count and the shard
files with their token counts.

Documents are stored one after another, each followed by a separator: the end-of-text token
(``<|endoftext|>``) for BPE, and a blank line (``"\\n\\n"``, the bytes 10 10) for the byte
tokenizer (the same stream as :func:`hyperbit.data.load_pystdlib`, and it keeps decoded samples
readable). A tokenizer without an end-of-text token uses its encoding of ``"\\n\\n"``. Either way
the separator stands for the same two bytes when bits per byte are counted
(:meth:`TokenShards.token_bytes`): the byte tokenizer's are two ordinary byte tokens, and the
end-of-text token counts as those two bytes.

Split rule: ``pystdlib`` keeps its own split (CRC-32 of the file's relative path); every other
source splits by a hash of the document index (:func:`hyperbit.data.sources.is_val_document`).

Batches (:meth:`TokenShards.get_batch`) are a pure function of ``(seed, position)``: a resumed run
that passes the same position (e.g. the optimizer step) reads exactly the same data, so the data
loader's whole state is one integer. Nothing is unpickled; files are JSON and raw arrays.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import DataError
from .sources import SPLITS
from .tokenizers import Tokenizer, load_tokenizer

FORMAT = "hyperbit-token-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise DataError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > 2**32:
        raise DataError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Load and validate ``meta.json`` of a prepared directory."""
    d = Path(directory)
    path = d / META_FILE
    if not d.is_dir():
        raise DataError(f"no such directory: {d}")
    if not path.is_file():
        raise DataError(f"{d} is not a prepared token directory (no {META_FILE}); run prepare first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: corrupt meta file ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} meta file")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {meta.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("dtype", "vocab_size", "tokenizer", "tokens", "shards"):
        if key not in meta:
            raise DataError(f"{path}: corrupt meta file (missing {key!r})")
    vocab = meta["vocab_size"]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise DataError(f"{path}: corrupt meta file (vocab_size {vocab!r})")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not supported (uint16 or uint32)")
    expected = token_dtype(vocab).name
    if meta["dtype"] != expected:
        raise DataError(f"{path}: dtype mismatch: {meta['dtype']} recorded but vocab_size {vocab} needs {expected}")
    if not isinstance(meta["shards"], dict) or not isinstance(meta["tokens"], dict):
        raise DataError(f"{path}: corrupt meta file (shards/tokens must be objects)")
    return meta


class TokenShards:
    """One split of a prepared directory, memory-mapped (nothing is loaded into RAM up front).

    ``get_batch(position, batch, seq, seed)`` samples ``batch`` windows of ``seq + 1`` tokens at
    offsets that depend only on ``(seed, position)``; ``iter_eval_batches(batch, seq)`` walks the
    split once in order.
    """

    def __init__(self, directory: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"split={split!r} is not allowed; choose one of {list(SPLITS)}")
        self.directory = Path(directory)
        self.split = split
        self.meta = read_meta(self.directory)
        self.vocab_size: int = self.meta["vocab_size"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        shards = self.meta["shards"].get(split)
        if not isinstance(shards, list):
            raise DataError(f"{self.directory / META_FILE}: corrupt meta file (no shard list for {split!r})")
        if not shards:
            raise DataError(f"{self.directory}: the {split!r} split is empty")
        self._maps: list[np.memmap] = []
        starts = [0]
        for entry in shards:
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not isinstance(entry.get("tokens"), int) or "/" in entry["file"] or "\\" in entry["file"]:
                raise DataError(f"{self.directory / META_FILE}: corrupt meta file (bad shard entry {entry!r})")
            path = self.directory / entry["file"]
            if not path.is_file():
                raise DataError(f"missing shard file: {path}")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise DataError(f"{path}: size {size} bytes is not a multiple of the {self.dtype.name} "
                                f"token size ({self.dtype.itemsize} bytes)")
            if size // self.dtype.itemsize != entry["tokens"] or entry["tokens"] <= 0:
                raise DataError(f"{path}: holds {size // self.dtype.itemsize} tokens but {META_FILE} "
                                f"records {entry['tokens']}")
            self._maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
            starts.append(starts[-1] + entry["tokens"])
        self._starts = np.array(starts, dtype=np.int64)
        self.num_tokens = int(starts[-1])
        if self.meta["tokens"].get(split) != self.num_tokens:
            raise DataError(f"{self.directory / META_FILE}: {split} token count {self.meta['tokens'].get(split)!r} "
                            f"does not match its shards ({self.num_tokens})")

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenShards({str(self.directory)!r}, {self.split!r}, num_tokens={self.num_tokens})"

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split (a copy, int64), across shard borders."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise DataError(f"range [{start}, {start + length}) is outside the {self.num_tokens} tokens "
                            f"of the {self.split!r} split")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self._starts[i])
            take = min(length - done, len(self._maps[i]) - lo)
            out[done:done + take] = self._maps[i][lo:lo + take]
            done += take
            i += 1
        return out

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer saved beside the shards, checked against ``meta.json``."""
        info = self.meta["tokenizer"]
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            raise DataError(f"{self.directory / META_FILE}: corrupt meta file (tokenizer entry)")
        tok = load_tokenizer(self.directory / info["file"])
        if tok.kind != info.get("kind") or tok.vocab_size != self.vocab_size:
            raise DataError(f"{self.directory}: tokenizer mismatch: file is {tok.kind} with vocab_size "
                            f"{tok.vocab_size}, meta.json records {info.get('kind')} with {self.vocab_size}")
        return tok

    def token_bytes(self) -> np.ndarray:
        """Bytes each token id of this data stands for (:meth:`Tokenizer.token_bytes` of the saved
        tokenizer), loaded on the first call and kept: the bytes of any tokens of the split are
        ``token_bytes()[ids].sum()``."""
        table = getattr(self, "_token_bytes", None)
        if table is None:
            table = self.load_tokenizer().token_bytes()
            if table.shape != (self.vocab_size,):
                raise DataError(f"{self.directory}: the tokenizer's byte table has {len(table)} "
                                f"entries, not vocab_size {self.vocab_size}")
            self._token_bytes = table
        return table

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise :class:`DataError` when a model with ``model_vocab_size`` cannot embed these ids."""
        if model_vocab_size < self.vocab_size:
            raise DataError(f"model vocab_size {model_vocab_size} is smaller than the data's "
                            f"vocab_size {self.vocab_size} ({self.directory}); pass "
                            f"model.vocab_size={self.vocab_size}")

    # --- batches --------------------------------------------------------------------------------

    def _check_shape(self, batch: int, seq: int) -> None:
        for name, v in (("batch", batch), ("seq", seq)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DataError(f"{name} must be a positive integer, got {v!r}")
        if self.num_tokens < seq + 1:
            raise DataError(f"the {self.split!r} split has {self.num_tokens} tokens; seq={seq} needs at least {seq + 1}")

    def batch_offsets(self, position: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
        """Window start offsets for ``(seed, position)``: PCG64 seeded with the first 16 bytes of
        ``blake2b(seed, position as two little-endian uint64)``, raw 64-bit outputs modulo the
        number of valid starts. Raw bit-generator streams are stable across numpy versions."""
        self._check_shape(batch, seq)
        for name, v in (("position", position), ("seed", seed)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < 2**64:
                raise DataError(f"{name} must be an integer in [0, 2**64), got {v!r}")
        key = hashlib.blake2b(struct.pack("<QQ", int(seed), int(position)), digest_size=16).digest()
        gen = np.random.PCG64(int.from_bytes(key, "little"))
        raw = gen.random_raw(batch)
        n_starts = self.num_tokens - seq  # starts 0 .. num_tokens - seq - 1 (window of seq + 1)
        return (raw % np.uint64(n_starts)).astype(np.int64)

    def get_batch(self, position: int, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 tensors of shape ``(batch, seq)``; ``y`` is ``x`` shifted by one
        (``y[:, t]`` is the token after ``x[:, t]``). The same arguments always give the same
        batch, so ``position`` (e.g. the optimizer step) is the loader's whole state."""
        starts = self.batch_offsets(position, batch, seq, seed)
        windows = np.stack([self.read(int(s), seq + 1) for s in starts])
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def num_eval_windows(self, seq: int) -> int:
        """Non-overlapping windows of ``seq`` targets covering the split (a tail < seq is dropped)."""
        return (self.num_tokens - 1) // seq

    def iter_eval_batches(self, batch: int, seq: int, max_batches: int | None = None
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split once, in order: window ``k`` is tokens ``[k*seq, k*seq + seq + 1)``; windows
        are grouped ``batch`` at a time (the last batch may be smaller). Every token but the
        first is a target exactly once, except a tail shorter than ``seq``."""
        self._check_shape(batch, seq)
        n = self.num_eval_windows(seq)
        if max_batches is not None:
            n = min(n, max_batches * batch)
        for b0 in range(0, n, batch):
            k = min(batch, n - b0)
            flat = self.read(b0 * seq, k * seq + 1)
            x = flat[:-1].reshape(k, seq).copy()
            y = flat[1:].reshape(k, seq)
            yield torch.from_numpy(x), torch.from_numpy(y)

"""Corpora, tokenizers and token shards.

``pystdlib``: the Python standard library sources of the running interpreter, a real text corpus
that exists on every machine the package runs on. :mod:`.sources` reads other corpora (text files,
directories, globs, JSON Lines, Hugging Face datasets saved to disk), :mod:`.tokenizers` holds the
byte and BPE tokenizers, :mod:`.prepare` tokenises a corpus once into the shards that
:mod:`.shards` reads, memory-mapped, with a deterministic batch sampler. :class:`DataConfig` is the
data section of a run's config. Every bad input raises :class:`DataError` with a one-line message.
"""

from .config import DataConfig
from .errors import DataError
from .prepare import prepare, prepare_data
from .pystdlib import load_pystdlib, pystdlib_files
from .shards import TokenShards, read_meta, token_dtype
from .sources import DecodeStats, Source, is_val_document, iter_documents, parse_source
from .tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, same_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "DecodeStats",
    "Source",
    "TokenShards",
    "Tokenizer",
    "is_val_document",
    "iter_documents",
    "load_pystdlib",
    "load_tokenizer",
    "parse_source",
    "prepare",
    "prepare_data",
    "pystdlib_files",
    "read_meta",
    "same_tokenizer",
    "token_dtype",
]

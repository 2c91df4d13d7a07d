"""Corpora, tokenizers and token shards.

``pystdlib``: the Python standard library sources of the running interpreter, a real text corpus
that exists on every machine the package runs on. :mod:`.sources` reads other corpora (text files,
directories, globs, JSON Lines, Hugging Face datasets saved to disk), :mod:`.tokenizers` holds the
byte and BPE tokenizers, and :mod:`.shards` tokenises a corpus once into memory-mapped shards with a
deterministic batch sampler. Every bad input raises :class:`DataError` with a one-line message.
"""

from .errors import DataError
from .pystdlib import load_pystdlib, pystdlib_files
from .shards import TokenShards, prepare, read_meta, token_dtype
from .sources import Source, is_val_document, iter_documents, parse_source
from .tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataError",
    "Source",
    "TokenShards",
    "Tokenizer",
    "is_val_document",
    "iter_documents",
    "load_pystdlib",
    "load_tokenizer",
    "parse_source",
    "prepare",
    "pystdlib_files",
    "read_meta",
    "token_dtype",
]

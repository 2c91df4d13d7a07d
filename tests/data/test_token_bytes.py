"""Bytes per token (``Tokenizer.token_bytes``): the table bits per byte divide by."""

from __future__ import annotations

import numpy as np
import pytest

from hyperbit.data import BPETokenizer, ByteTokenizer, load_tokenizer
from hyperbit.data.tokenizers import byte_level_alphabet

TEXTS = [
    "plain ascii, with digits 0123 and punctuation {}[]();",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🐍🚀👩‍👩‍👧 and flags 🇯🇵 mixed with ✓ ünïcödé",
    "\t\n\r\x00\x7f\u00a0\u00ad\u2028 control and odd spaces",
    "ÿþ\u0100\u0143 Latin-1 and Latin Extended-A, the bytes the byte-level alphabet remaps",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([t * 20 for t in TEXTS], vocab_size=400)


def test_byte_tokenizer_counts_one_byte_per_id():
    table = ByteTokenizer().token_bytes()
    assert table.dtype == np.int64 and table.tolist() == [1] * 256
    for text in TEXTS:
        assert int(table[ByteTokenizer().encode(text)].sum()) == len(text.encode("utf-8"))


def test_bpe_table_sums_to_the_utf8_bytes_of_any_text(bpe, tmp_path):
    table = bpe.token_bytes()
    assert table.shape == (bpe.vocab_size,) and table.dtype == np.int64
    assert bpe.vocab_size > 300  # merges across multi-byte characters were learnt
    held_out = ["新しい文章と🐍", "ascii only", "Ĳ ǅ ℌ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "".join(TEXTS)]
    for text in TEXTS + held_out:
        ids = bpe.encode(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
    # tokens that hold part of a character (decoded alone: U+FFFD) count their own bytes, not
    # the bytes of their decoded text
    partial = [i for i in range(bpe.vocab_size) if "\ufffd" in bpe.decode([i])]
    assert len(partial) > 20
    assert sum(table[i] != len(bpe.decode([i]).encode("utf-8")) for i in partial) > 10
    # the 256 single-byte tokens count 1, whatever character stands for them
    vocab = bpe._tok.get_vocab()
    assert all(table[vocab[c]] == 1 for c in byte_level_alphabet())
    # the end-of-text token stands for the blank line byte shards hold in its place
    assert table[bpe.eot_id] == 2
    assert int(table[bpe.encode("ab<|endoftext|>cd")].sum()) == 4 + 2
    # a saved and reloaded tokenizer has the same table
    bpe.save(tmp_path / "bpe.json")
    np.testing.assert_array_equal(load_tokenizer(tmp_path / "bpe.json").token_bytes(), table)


def test_byte_level_alphabet_maps_each_byte_to_the_libraries_character(bpe):
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    # the library decodes each alphabet character to the byte the table says it stands for
    vocab = bpe._tok.get_vocab()
    for char, byte in alphabet.items():
        if byte < 0x80:
            assert bpe.decode([vocab[char]]) == chr(byte)
    assert bpe.decode([vocab[c] for c in "æĹ¥æľ¬"]) == "日本"  # E6 97 A5 E6 9C AC


def test_table_is_computed_once_and_read_only(bpe):
    first = bpe.token_bytes()
    assert bpe.token_bytes() is first
    with pytest.raises(ValueError):
        first[0] = 5


def test_a_bpe_that_is_not_byte_level_counts_each_token_decoded():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    vocab = {"a": 0, "b": 1, "ab": 2, "日": 3, "日a": 4}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("日", "a")]))
    tok = BPETokenizer(hf)
    assert tok.token_bytes().tolist() == [1, 1, 2, 3, 4]

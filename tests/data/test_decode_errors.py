"""Text that is not UTF-8: ``decode_errors`` strict (one line naming the file and byte offset),
replace (U+FFFD) or skip (left out and counted in meta.json), from the library, the run's data
section and ``hyperbit prepare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hyperbit.cli import main
from hyperbit.config import ConfigError
from hyperbit.data import DataConfig, DataError, DecodeStats, TokenShards, iter_documents, prepare, prepare_data

LATIN1 = "café crème, naïve".encode("latin-1")  # first invalid byte: offset 3


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, repr(msg)
    return msg


def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A directory of five files; the third is Latin-1, the others UTF-8 (CJK included)."""
    root = tmp_path / "corpus"
    root.mkdir()
    good = [f"document {i} 日本語 ✓ " * (i + 1) for i in range(4)]
    for name, text in zip(("a.txt", "b.txt", "d.txt", "e.txt"), good):
        (root / name).write_text(text, encoding="utf-8")
    (root / "c.txt").write_bytes(b"valid start " + LATIN1)  # invalid byte at 12 + 3
    return root, good


def test_text_files_strict_replace_skip(tmp_path):
    root, good = corpus(tmp_path)
    msg = one_line_error(r"c\.txt: not UTF-8 text \(invalid byte at offset 15\)", iter_documents, root)
    assert "decode_errors" in msg and "'replace' or 'skip'" in msg  # says how to go on

    stats = DecodeStats()
    docs = list(iter_documents(root, decode_errors="replace", stats=stats))
    replaced = (b"valid start " + LATIN1).decode("utf-8", errors="replace")
    assert docs == [good[0], good[1], replaced, good[2], good[3]]
    assert replaced == "valid start caf\ufffd cr\ufffdme, na\ufffdve"
    assert (stats.replaced_files, stats.skipped_files, stats.replaced_lines, stats.skipped_lines) == (1, 0, 0, 0)
    assert stats.examples == [f"{root / 'c.txt'} (byte offset 15)"]

    stats = DecodeStats()
    assert list(iter_documents(root, decode_errors="skip", stats=stats)) == good
    assert (stats.skipped_files, stats.replaced_files) == (1, 0)
    assert stats.describe("skip") == {"mode": "skip", "skipped_files": 1, "skipped_lines": 0, "replaced_files": 0,
                                      "replaced_lines": 0, "examples": [f"{root / 'c.txt'} (byte offset 15)"]}
    # a single text file that is skipped leaves an empty corpus, and the error says why
    one_line_error(r"empty corpus: text:.*c\.txt has no non-empty documents \(1 not UTF-8, skipped\)",
                   iter_documents, root / "c.txt", decode_errors="skip")
    one_line_error(r"decode_errors='ignore' is not allowed; choose one of \['strict', 'replace', 'skip'\]",
                   iter_documents, root, decode_errors="ignore")


def test_jsonl_lines_strict_replace_skip(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [b'{"text": "first"}\n', b'{"text": "caf\xe9"}\n', b'{"text": "third \xe6\x97\xa5"}\n']
    f.write_bytes(b"".join(lines))
    offset = len(lines[0]) + len(b'{"text": "caf')
    one_line_error(rf"d\.jsonl:2: not UTF-8 text \(invalid byte at offset {offset}\); set decode_errors",
                   iter_documents, f)
    stats = DecodeStats()
    assert list(iter_documents(f, decode_errors="replace", stats=stats)) == ["first", "caf\ufffd", "third 日"]
    assert (stats.replaced_lines, stats.skipped_lines, stats.replaced_files) == (1, 0, 0)
    assert stats.examples == [f"{f}:2 (byte offset {offset})"]
    stats = DecodeStats()
    assert list(iter_documents(f, decode_errors="skip", stats=stats)) == ["first", "third 日"]
    assert (stats.skipped_lines, stats.replaced_lines) == (1, 0)


def test_prepare_records_what_was_skipped_or_replaced(tmp_path):
    root, good = corpus(tmp_path)
    out = tmp_path / "strict"
    one_line_error(r"c\.txt: not UTF-8 text \(invalid byte at offset 15\)", prepare, root, out, val_fraction=0.0)
    assert not (out / "meta.json").exists() and not list(out.glob("*.bin"))

    meta = prepare(root, tmp_path / "skip", val_fraction=0.0, decode_errors="skip")
    assert meta["decode_errors"] == {"mode": "skip", "skipped_files": 1, "skipped_lines": 0, "replaced_files": 0,
                                     "replaced_lines": 0, "examples": [f"{root / 'c.txt'} (byte offset 15)"]}
    assert json.loads((tmp_path / "skip" / "meta.json").read_text())["decode_errors"] == meta["decode_errors"]
    assert meta["documents"]["train"] == 4
    stream = TokenShards(tmp_path / "skip").read(0, meta["tokens"]["train"])
    np.testing.assert_array_equal(stream, np.frombuffer("".join(d + "\n\n" for d in good).encode(), np.uint8))

    meta = prepare(root, tmp_path / "replace", val_fraction=0.0, decode_errors="replace")
    assert (meta["decode_errors"]["mode"], meta["decode_errors"]["replaced_files"]) == ("replace", 1)
    assert meta["documents"]["train"] == 5
    stream = TokenShards(tmp_path / "replace").read(0, meta["tokens"]["train"]).astype(np.uint8).tobytes()
    assert stream.count("\ufffd".encode()) == 3 and b"valid start caf\xef\xbf\xbd cr" in stream

    meta = prepare(root, tmp_path / "clean", val_fraction=0.0, pattern="[abde].txt")
    assert meta["decode_errors"] == {"mode": "strict", "skipped_files": 0, "skipped_lines": 0,
                                     "replaced_files": 0, "replaced_lines": 0, "examples": []}

    # the BPE tokenizer is trained on the same documents: skip works for it too
    meta = prepare(root, tmp_path / "bpe", tokenizer="bpe", vocab_size=300, val_fraction=0.0, decode_errors="skip")
    assert meta["decode_errors"]["skipped_files"] == 1 and meta["documents"]["train"] == 4


def test_data_config_field_reaches_prepare(tmp_path):
    root, _ = corpus(tmp_path)
    assert DataConfig().decode_errors == "strict"
    with pytest.raises(ConfigError, match=r"data\.decode_errors='lenient' is not allowed; choose one of "
                                          r"\['strict', 'replace', 'skip'\]") as info:
        DataConfig(decode_errors="lenient")
    assert "\n" not in str(info.value)
    logged = []
    prepare_data(DataConfig(path=str(root), val_fraction=0.0, decode_errors="skip"), tmp_path / "run", logged.append)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["decode_errors"]["mode"] == "skip" and meta["decode_errors"]["skipped_files"] == 1
    one_line_error(r"c\.txt: not UTF-8 text", prepare_data, DataConfig(path=str(root), val_fraction=0.0),
                   tmp_path / "strict", logged.append)


def test_cli_prepare_decode_errors(tmp_path, capsys):
    root, _ = corpus(tmp_path)
    assert main(["prepare", str(root), str(tmp_path / "a"), "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "c.txt: not UTF-8 text (invalid byte at offset 15)" in err

    assert main(["prepare", str(root), str(tmp_path / "b"), "--val-fraction", "0", "--decode-errors", "skip"]) == 0
    out = capsys.readouterr().out
    assert "not UTF-8, skipped (left out): 1 files, 0 JSON Lines lines" in out and "c.txt (byte offset 15)" in out
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["decode_errors"]["skipped_files"] == 1

    assert main(["prepare", str(root), str(tmp_path / "c"), "--val-fraction", "0", "--decode-errors", "replace"]) == 0
    assert "not UTF-8, replaced (invalid bytes as U+FFFD): 1 files" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["decode_errors"]["replaced_files"] == 1

    with pytest.raises(SystemExit) as info:
        main(["prepare", str(root), str(tmp_path / "d"), "--decode-errors", "ignore"])
    assert info.value.code == 2 and "invalid choice: 'ignore'" in capsys.readouterr().err

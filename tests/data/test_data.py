"""Data pipeline: sources, tokenizers, token shards and the deterministic batch sampler."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperbit.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Source,
    TokenShards,
    Tokenizer,
    is_val_document,
    iter_documents,
    load_pystdlib,
    load_tokenizer,
    parse_source,
    prepare,
    pystdlib_files,
    read_meta,
    token_dtype,
)

UNICODE = "héllo wörld — ✓ 日本語 🐍\n\tend\x00"


def raises(match: str, fn, *args, **kwargs) -> str:
    """Call ``fn`` (draining a generator) and assert a one-line DataError matching ``match``."""
    with pytest.raises(DataError, match=match) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg, repr(msg)
    return msg


def python_docs(n: int, start: int = 0) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in pystdlib_files("train")[start:start + n]]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(python_docs(12), vocab_size=600)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- tokenizers ---------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip_and_save(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and len(ids) > len(UNICODE)  # multi-byte chars
    assert tok.vocab_size == 256 and tok.eot_id is None and max(ids) < 256
    assert tok.decode(ids) == UNICODE
    assert tok.decode([0xFF, 65, 0xE6, 0x97]) == "\ufffdA\ufffd"  # invalid UTF-8 is replaced
    tok.save(tmp_path / "tok.json")
    assert json.loads((tmp_path / "tok.json").read_text()) == {"kind": "byte", "version": 1, "vocab_size": 256}
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(loaded, ByteTokenizer) and loaded.encode(UNICODE) == ids
    raises("byte tokenizer: token ids must be in 0..255", tok.decode, [300])


def test_bpe_train_save_load_roundtrip(tmp_path, bpe):
    assert 400 < bpe.vocab_size <= 600 and bpe.eot_id == 0
    for text in (UNICODE, "def f(x):\n    return {'a': x ** 2}  # ünïcode\n", "", "   \n\n\n  x"):
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode("<|endoftext|>") == [0]
    bpe.save(tmp_path / "bpe.json")
    data = json.loads((tmp_path / "bpe.json").read_text())
    assert data["model"]["type"] == "BPE" and data["added_tokens"][0]["content"] == "<|endoftext|>"
    loaded = load_tokenizer(tmp_path / "bpe.json")
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == bpe.vocab_size
    held_out = "".join(python_docs(3, start=40))
    assert loaded.encode(held_out) == bpe.encode(held_out)
    assert BPETokenizer.load(tmp_path / "bpe.json").decode(bpe.encode(held_out)) == held_out
    # the saved file is the tokenizers library's own format
    import tokenizers

    assert tokenizers.Tokenizer.from_file(str(tmp_path / "bpe.json")).encode(held_out).ids == bpe.encode(held_out)


def test_bpe_compresses_python_source(bpe):
    held_out = "".join(python_docs(3, start=40))
    n_bytes = len(held_out.encode("utf-8"))
    n_tokens = len(bpe.encode(held_out))
    assert n_tokens < 0.7 * n_bytes, (n_tokens, n_bytes)


def test_tokenizer_errors(tmp_path):
    raises(r"BPE vocab_size must be an integer >= 257", BPETokenizer.train, ["abc"], 100)
    raises(r"no such tokenizer file: .*nope\.json", load_tokenizer, tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    raises(r"bad\.json: tokenizer file is not valid JSON", load_tokenizer, tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    raises(r"list\.json: tokenizer file must hold a JSON object", load_tokenizer, tmp_path / "list.json")
    (tmp_path / "other.json").write_text('{"kind": "sentencepiece"}')
    raises(r"other\.json: unknown tokenizer file", load_tokenizer, tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    raises(r"broken\.json: not a valid tokenizers JSON file", load_tokenizer, tmp_path / "broken.json")
    ByteTokenizer().save(tmp_path / "byte.json")
    raises(r"byte\.json: not a bpe tokenizer file \(kind 'byte'\)", BPETokenizer.load, tmp_path / "byte.json")


# --- sources ------------------------------------------------------------------------------------


def test_text_file_source(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("First para\n  still first.\n\n\n   \nSecond\n\n  Third, indented  \n")
    assert parse_source(f) == Source("text", str(f))
    assert list(iter_documents(f)) == ["First para\n  still first.", "Second", "  Third, indented"]
    assert list(iter_documents(f, sample_by="line")) == ["First para", "  still first.", "Second",
                                                         "  Third, indented  "]
    assert list(iter_documents(f"text:{f}", sample_by="document")) == [f.read_text()]


def test_dir_source_sorted_and_pattern(tmp_path):
    root = tmp_path / "corpus"
    for rel, text in [("b.txt", "bee"), ("sub/a.txt", "sub a"), ("a.txt", "ay"), ("notes.md", "markdown"),
                      ("sub/deeper/c.txt", "deep c"), ("empty.txt", "")]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert parse_source(root).kind == "dir"
    # sorted by relative POSIX path; the empty file yields no document; .md is not matched
    assert list(iter_documents(root)) == ["ay", "bee", "sub a", "deep c"]
    assert list(iter_documents(f"dir:{root}", pattern="*.md")) == ["markdown"]
    assert list(iter_documents(root, pattern="sub/**/*.txt")) == ["sub a", "deep c"]


def test_glob_source(tmp_path):
    for rel, text in [("x/2.txt", "two"), ("x/1.txt", "one"), ("y/3.txt", "three"), ("x/skip.log", "no")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    spec = str(tmp_path / "**" / "*.txt")
    assert parse_source(spec).kind == "glob"
    assert list(iter_documents(spec)) == ["one", "two", "three"]
    assert list(iter_documents("glob:" + str(tmp_path / "x" / "*"))) == ["one", "two", "no"]


def test_jsonl_source(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha", "body": "A"}, "", {"text": "", "body": "B"},
                                           {"text": "gamma ✓", "body": "C"}])
    assert parse_source(f).kind == "jsonl"
    assert list(iter_documents(f)) == ["alpha", "gamma ✓"]  # blank line and empty text skipped
    assert list(iter_documents(f, text_field="body")) == ["A", "B", "C"]
    g = tmp_path / "data.json_lines"
    g.write_text(f.read_text())
    assert parse_source(f"jsonl:{g}").kind == "jsonl" and list(iter_documents(f"jsonl:{g}")) == ["alpha", "gamma ✓"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    ok = {"text": "fine"}
    raises(r"bad\.jsonl:2: not valid JSON", iter_documents, write_jsonl(tmp_path / "bad.jsonl", [ok, "{oops"]))
    raises(r"nofield\.jsonl:3: no field 'text'", iter_documents,
           write_jsonl(tmp_path / "nofield.jsonl", [ok, ok, {"content": "x"}]))
    raises(r"num\.jsonl:1: field 'text' is int, not a string", iter_documents,
           write_jsonl(tmp_path / "num.jsonl", [{"text": 5}]))
    raises(r"arr\.jsonl:1: expected a JSON object, got list", iter_documents,
           write_jsonl(tmp_path / "arr.jsonl", [[1, 2]]))
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "a"}\n\xff\xfe\n')
    raises(r"bin\.jsonl:2: not UTF-8 text", iter_documents, tmp_path / "bin.jsonl")


def test_hf_dataset_source(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": ["first", "", "second ✓", "third"], "body": ["a", "b", "c", "d"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert parse_source(tmp_path / "ds").kind == "hf"
    assert list(iter_documents(tmp_path / "ds")) == ["first", "second ✓", "third"]
    assert list(iter_documents(f"hf:{tmp_path / 'ds'}", text_field="body")) == ["a", "b", "c", "d"]
    raises(r"ds: no column 'content' \(columns: \['text', 'body'\]\)", iter_documents, tmp_path / "ds",
           text_field="content")

    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([3])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert parse_source(tmp_path / "dd").kind == "hf"
    assert list(iter_documents(tmp_path / "dd")) == ["first", "second ✓", "third"]  # "train" by default
    assert list(iter_documents(tmp_path / "dd", hf_split="validation")) == ["third"]
    raises(r"dd: choose a split with hf_split; available: \['train', 'validation'\]", iter_documents,
           tmp_path / "dd", hf_split="test")

    (tmp_path / "plain").mkdir()
    raises(r"plain: not a dataset saved with save_to_disk", iter_documents, f"hf:{tmp_path / 'plain'}")
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "ints"))
    raises(r"ints: row 0: column 'text' is int, not a string", iter_documents, tmp_path / "ints")

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    raises(r"needs the 'datasets' package: install datasets", iter_documents, tmp_path / "ds")


def test_hf_missing_datasets_package(tmp_path, monkeypatch):
    """Runs even where datasets is not installed: the error tells the user what to install."""
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)
    raises(r"install datasets", iter_documents, f"hf:{tmp_path / 'ds'}")


def test_source_errors(tmp_path):
    raises(r"no such file or directory: .*missing\.txt", iter_documents, tmp_path / "missing.txt")
    raises(r"no such file: .*gone\.txt", iter_documents, f"text:{tmp_path / 'gone.txt'}")
    raises(r"no such directory: .*nodir", iter_documents, f"dir:{tmp_path / 'nodir'}")
    raises(r"no such file: .*no\.jsonl", iter_documents, f"jsonl:{tmp_path / 'no.jsonl'}")
    (tmp_path / "emptydir").mkdir()
    raises(r"empty corpus: no files match '\*\*/\*\.txt' in .*emptydir", iter_documents, tmp_path / "emptydir")
    raises(r"empty corpus: no files match the glob", iter_documents, str(tmp_path / "*.nothing"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    raises(r"empty corpus: text:.*blank\.txt has no non-empty documents", iter_documents, tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    raises(r"latin1\.txt: not UTF-8 text \(invalid byte at offset 3\)", iter_documents, tmp_path / "latin1.txt")
    raises(r"unknown source option 'txt_field'", iter_documents, "pystdlib", txt_field="x")
    raises(r"sample_by='words' is not allowed", iter_documents, tmp_path / "blank.txt", sample_by="words")
    raises(r"unknown source kind 'csv'", Source, "csv", "x.csv")
    raises(r"source kind 'text' needs a path", parse_source, "text:")
    raises(r"max_bytes must be a positive integer", parse_source, "pystdlib", max_bytes=0)
    raises(r"split='test' is not allowed", iter_documents, "pystdlib", split="test")
    raises(r"val_fraction must be in \[0, 1\)", iter_documents, "pystdlib", split="val", val_fraction=1.5)


def test_max_bytes_and_splits(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc{i:03d}"} for i in range(200)])
    assert list(iter_documents(f, max_bytes=13)) == ["doc000", "doc001", "doc002"]  # crossing doc is whole
    train = list(iter_documents(f, split="train", val_fraction=0.1))
    val = list(iter_documents(f, split="val", val_fraction=0.1))
    assert val[:10] == [f"doc{i:03d}" for i in (0, 19, 44, 46, 58, 61, 83, 88, 89, 90)]
    assert sorted(train + val) == [f"doc{i:03d}" for i in range(200)] and not set(train) & set(val)
    assert list(iter_documents(f, split="val", val_fraction=0.0)) == []


def test_val_split_rule_is_fixed_and_proportional():
    # pinned: changing the rule would silently move documents between train and val
    assert [i for i in range(100) if is_val_document(i, 0.1)] == [0, 19, 44, 46, 58, 61, 83, 88, 89, 90]
    frac = sum(is_val_document(i, 0.05) for i in range(20000)) / 20000
    assert 0.045 < frac < 0.055
    assert not any(is_val_document(i, 0.0) for i in range(1000))


# --- prepare + shards ---------------------------------------------------------------------------


def stream_of(shards: TokenShards) -> np.ndarray:
    return shards.read(0, shards.num_tokens)


def make_jsonl_corpus(tmp_path: Path, n: int = 40) -> tuple[Path, list[str]]:
    docs = [f"document {i}: " + "λx. x + 1 " * (i % 7 + 1) for i in range(n)]
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs]), docs


def test_prepare_byte_shards_recover_stream(tmp_path):
    src, docs = make_jsonl_corpus(tmp_path)
    out = tmp_path / "tok"
    meta = prepare(src, out, val_fraction=0.2, shard_size=100)
    val_docs = [d for i, d in enumerate(docs) if is_val_document(i, 0.2)]
    train_docs = [d for i, d in enumerate(docs) if not is_val_document(i, 0.2)]
    assert val_docs and train_docs
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        expected = np.frombuffer("".join(d + "\n\n" for d in split_docs).encode(), dtype=np.uint8)
        shards = TokenShards(out, split)
        assert shards.num_tokens == len(expected) == meta["tokens"][split] == len(shards)
        np.testing.assert_array_equal(stream_of(shards), expected)
        assert meta["documents"][split] == len(split_docs)
        files = sorted(p.name for p in out.glob(f"{split}_*.bin"))
        assert files == [f"{split}_{i:03d}.bin" for i in range(-(-len(expected) // 100))]
        assert [s["file"] for s in meta["shards"][split]] == files
        assert all((out / f).stat().st_size == 2 * s["tokens"] for f, s in zip(files, meta["shards"][split]))
        assert all(s["tokens"] == 100 for s in meta["shards"][split][:-1])
    assert json.loads((out / "meta.json").read_text()) == meta == read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256 and meta["version"] == 1
    assert meta["tokenizer"] == {"kind": "byte", "file": "tokenizer.json", "eot_id": None}
    assert meta["separator"] == {"kind": "\n\n", "ids": [10, 10]}
    assert meta["source"] == {"kind": "jsonl", "path": str(src.resolve()), "text_field": "text"}
    assert isinstance(TokenShards(out).load_tokenizer(), ByteTokenizer)
    text = ByteTokenizer().decode(stream_of(TokenShards(out, "val")).tolist())
    assert text == "".join(d + "\n\n" for d in val_docs)


def test_prepare_bpe_shards_recover_stream(tmp_path):
    root = tmp_path / "py"
    root.mkdir()
    docs = python_docs(8)
    for i, d in enumerate(docs):
        (root / f"m{i}.py").write_text(d)
    out = tmp_path / "tok"
    meta = prepare(root, out, tokenizer="bpe", vocab_size=500, val_fraction=0.3, pattern="*.py", shard_size=4096)
    tok = TokenShards(out).load_tokenizer()
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == meta["vocab_size"] <= 500
    assert meta["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json", "eot_id": 0}
    assert meta["separator"] == {"kind": "end-of-text token", "ids": [0]}
    n_eot = 0
    for split in ("train", "val"):
        split_docs = [d for i, d in enumerate(docs) if is_val_document(i, 0.3) == (split == "val")]
        expected = [t for d in split_docs for t in tok.encode(d) + [0]]
        got = stream_of(TokenShards(out, split))
        assert got.tolist() == expected
        assert tok.decode(got.tolist()) == "".join(d + "<|endoftext|>" for d in split_docs)
        n_eot += int((got == 0).sum())
    assert n_eot == len(docs)
    # reusing the saved tokenizer file gives identical shards
    meta2 = prepare(root, tmp_path / "tok2", tokenizer=out / "tokenizer.json", val_fraction=0.3, pattern="*.py")
    assert meta2["tokens"] == meta["tokens"]
    np.testing.assert_array_equal(stream_of(TokenShards(tmp_path / "tok2")), stream_of(TokenShards(out)))


class WideTokenizer(Tokenizer):
    """A test tokenizer whose ids exceed uint16: code point + 65000."""

    kind = "wide"

    @property
    def vocab_size(self) -> int:
        return 70000

    def encode(self, text):
        return [min(ord(c) + 65000, 69998) for c in text]

    def save(self, path):
        Path(path).write_text('{"kind": "wide"}')


def test_token_dtype_selection(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32
    raises(r"vocab_size must be a positive integer", token_dtype, 0)
    src, docs = make_jsonl_corpus(tmp_path, n=5)
    meta = prepare(src, tmp_path / "wide", tokenizer=WideTokenizer(), val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["separator"]["ids"] == [65010, 65010]
    shards = TokenShards(tmp_path / "wide")
    expected = WideTokenizer().encode("".join(d + "\n\n" for d in docs))
    assert max(expected) > 65535 and stream_of(shards).tolist() == expected
    assert (tmp_path / "wide" / "train_000.bin").stat().st_size == 4 * len(expected)
    assert prepare(src, tmp_path / "narrow", val_fraction=0.0)["dtype"] == "uint16"


@pytest.fixture()
def byte_shards(tmp_path) -> TokenShards:
    f = tmp_path / "c.txt"
    f.write_text("x" * 1000)
    prepare(f, tmp_path / "o", val_fraction=0.0)
    src, _ = make_jsonl_corpus(tmp_path, n=60)
    prepare(src, tmp_path / "tok", val_fraction=0.0, shard_size=97)  # many shards: windows cross borders
    return TokenShards(tmp_path / "tok")


def test_get_batch_is_deterministic(tmp_path, byte_shards):
    shards = byte_shards
    stream = stream_of(shards)
    x, y = shards.get_batch(5, batch=8, seq=32, seed=1)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    x2, y2 = TokenShards(shards.directory, "train").get_batch(5, batch=8, seq=32, seed=1)  # "resumed" reader
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(shards.get_batch(6, 8, 32, seed=1)[0], x)
    assert not torch.equal(shards.get_batch(5, 8, 32, seed=2)[0], x)
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = shards.batch_offsets(5, 8, 32, seed=1)
    for row, s in enumerate(starts):
        assert torch.equal(x[row], torch.from_numpy(stream[s:s + 32])) and torch.equal(y[row], torch.from_numpy(stream[s + 1:s + 33]))
    # offsets are spread over the whole split and a window can end on the last token
    all_starts = np.concatenate([shards.batch_offsets(p, 64, 32) for p in range(50)])
    assert all_starts.min() >= 0 and all_starts.max() <= shards.num_tokens - 33
    assert all_starts.max() > 0.95 * (shards.num_tokens - 33) and all_starts.min() < 0.05 * shards.num_tokens
    assert any(s // 97 != (s + 32) // 97 for s in all_starts)  # some windows cross a shard border
    # pinned: the sampler's stream must not change between versions (resumed runs read the same data)
    pinned = TokenShards(tmp_path / "o")
    assert pinned.num_tokens == 1002
    assert pinned.batch_offsets(0, 4, 8).tolist() == [437, 4, 243, 799]
    assert pinned.batch_offsets(1, 4, 8, seed=7).tolist() == [20, 110, 311, 680]


def test_iter_eval_batches_covers_split_once(byte_shards):
    shards = byte_shards
    stream = stream_of(shards)
    batches = list(shards.iter_eval_batches(batch=5, seq=64))
    n = (shards.num_tokens - 1) // 64
    assert n == shards.num_eval_windows(64) and sum(len(x) for x, _ in batches) == n
    assert [len(x) for x, _ in batches] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert xs.dtype == torch.int64
    np.testing.assert_array_equal(xs.numpy(), stream[:n * 64])
    np.testing.assert_array_equal(ys.numpy(), stream[1:n * 64 + 1])
    assert sum(len(x) for x, _ in shards.iter_eval_batches(5, 64, max_batches=2)) == 10
    raises(r"the 'train' split has \d+ tokens; seq=100000 needs at least 100001",
           shards.iter_eval_batches(2, 100_000).__next__)


def test_pystdlib_prepare_matches_embedded_corpus(tmp_path):
    meta = prepare("pystdlib", tmp_path / "ps", max_bytes=60_000)
    assert meta["source"] == {"kind": "pystdlib", "max_bytes": 60_000}
    assert meta["split_rule"].startswith("pystdlib: crc32") and meta["val_fraction"] is None
    for split in ("train", "val"):
        shards = TokenShards(tmp_path / "ps", split)
        assert shards.num_tokens >= 60_000
        expected = load_pystdlib(split, max_bytes=shards.num_tokens).numpy()
        np.testing.assert_array_equal(stream_of(shards), expected)
        n_docs = meta["documents"][split]
        files = pystdlib_files(split)[:n_docs]
        assert shards.num_tokens == sum(p.stat().st_size + 2 for p in files)
        assert sum(p.stat().st_size + 2 for p in files[:-1]) < 60_000


# --- error cases --------------------------------------------------------------------------------


def test_prepare_errors(tmp_path):
    src, _ = make_jsonl_corpus(tmp_path, n=20)
    out = tmp_path / "tok"
    prepare(src, out, val_fraction=0.2, shard_size=50)
    n_before = len(list(out.glob("train_*.bin")))
    raises(r"tok already holds prepared shards; pass overwrite=True", prepare, src, out)
    prepare(src, out, val_fraction=0.2, overwrite=True)  # stale shards are removed
    assert n_before > 1 and sorted(p.name for p in out.glob("*.bin")) == ["train_000.bin", "val_000.bin"]
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "just one document"}])
    raises(r"the validation split is empty \(1 documents, val_fraction=0.01\); use more documents or "
           r"val_fraction=0", prepare, one, tmp_path / "one")
    assert not (tmp_path / "one" / "meta.json").exists() and not list((tmp_path / "one").glob("*.bin"))
    raises(r"tokenizer='wordpiece' is not 'byte', 'bpe' or an existing tokenizer file", prepare, src,
           tmp_path / "x", tokenizer="wordpiece")
    raises(r"the byte tokenizer has vocab_size 256, got vocab_size=1000", prepare, src, tmp_path / "x",
           vocab_size=1000)
    raises(r"val_fraction must be in \[0, 1\), got 1.0", prepare, src, tmp_path / "x", val_fraction=1.0)
    raises(r"shard_size must be a positive integer", prepare, src, tmp_path / "x", shard_size=0)
    (tmp_path / "afile").write_text("x")
    raises(r"output path exists and is not a directory", prepare, src, tmp_path / "afile")
    raises(r"no such file or directory", prepare, tmp_path / "nothing.txt", tmp_path / "x")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    raises(r"empty corpus: jsonl:.*empty\.jsonl has no non-empty documents", prepare, tmp_path / "empty.jsonl",
           tmp_path / "x")
    raises(r"BPE vocab_size must be an integer >= 257", prepare, src, tmp_path / "x", tokenizer="bpe", vocab_size=10)


def test_token_shards_errors(tmp_path):
    src, _ = make_jsonl_corpus(tmp_path, n=20)
    good = tmp_path / "good"
    prepare(src, good, val_fraction=0.0)

    def variant(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for p in good.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        return d

    def edit_meta(d: Path, **changes) -> None:
        meta = json.loads((d / "meta.json").read_text())
        meta.update(changes)
        (d / "meta.json").write_text(json.dumps(meta))

    raises(r"no such directory: .*absent", TokenShards, tmp_path / "absent")
    (tmp_path / "bare").mkdir()
    raises(r"bare is not a prepared token directory \(no meta\.json\); run prepare first", TokenShards, tmp_path / "bare")
    d = variant("corrupt")
    (d / "meta.json").write_text('{"format": "hyperbit-token-shards", "vers')
    raises(r"corrupt.meta\.json: corrupt meta file \(JSONDecodeError\)", TokenShards, d)
    d = variant("foreign")
    edit_meta(d, format="something-else")
    raises(r"foreign.meta\.json: not a hyperbit-token-shards meta file", TokenShards, d)
    d = variant("future")
    edit_meta(d, version=99)
    raises(r"format version 99 is not supported \(expected 1\)", TokenShards, d)
    d = variant("dtype")
    edit_meta(d, dtype="uint32")
    raises(r"dtype mismatch: uint32 recorded but vocab_size 256 needs uint16", TokenShards, d)
    d = variant("float")
    edit_meta(d, dtype="float32")
    raises(r"dtype 'float32' is not supported", TokenShards, d)
    d = variant("nokey")
    meta = json.loads((d / "meta.json").read_text())
    del meta["shards"]
    (d / "meta.json").write_text(json.dumps(meta))
    raises(r"corrupt meta file \(missing 'shards'\)", TokenShards, d)
    d = variant("odd")
    with open(d / "train_000.bin", "ab") as f:
        f.write(b"\x00")
    raises(r"train_000\.bin: size \d+ bytes is not a multiple of the uint16 token size \(2 bytes\)", TokenShards, d)
    d = variant("truncated")
    data = (d / "train_000.bin").read_bytes()
    (d / "train_000.bin").write_bytes(data[:-4])
    raises(rf"train_000\.bin: holds {len(data) // 2 - 2} tokens but meta\.json records {len(data) // 2}", TokenShards, d)
    d = variant("noshard")
    (d / "train_000.bin").unlink()
    raises(r"missing shard file: .*train_000\.bin", TokenShards, d)
    d = variant("escape")
    edit_meta(d, shards={"train": [{"file": "../good/train_000.bin", "tokens": 1}], "val": []})
    raises(r"corrupt meta file \(bad shard entry", TokenShards, d)
    raises(r"good: the 'val' split is empty", TokenShards, good, "val")
    raises(r"split='test' is not allowed", TokenShards, good, "test")
    shards = TokenShards(good)
    raises(r"seq=100000 needs at least 100001", shards.get_batch, 0, 2, 100_000)
    raises(r"batch must be a positive integer, got 0", shards.get_batch, 0, 0, 8)
    raises(r"position must be an integer in \[0, 2\*\*64\), got -1", shards.get_batch, -1, 2, 8)
    raises(r"range \[0, \d+\) is outside the \d+ tokens", shards.read, 0, shards.num_tokens + 1)
    raises(r"model vocab_size 100 is smaller than the data's vocab_size 256 .*; pass model.vocab_size=256", shards.check_vocab, 100)
    # tokenizer file that does not match meta.json
    d = variant("wrongtok")
    BPETokenizer.train(["abc abd abe"] * 10, vocab_size=270).save(d / "tokenizer.json")
    raises(r"tokenizer mismatch: file is bpe with vocab_size \d+, meta\.json records byte with 256",
           TokenShards(d).load_tokenizer)
    d = variant("notok")
    (d / "tokenizer.json").unlink()
    raises(r"no such tokenizer file: .*notok.tokenizer\.json", TokenShards(d).load_tokenizer)

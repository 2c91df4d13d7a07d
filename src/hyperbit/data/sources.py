"""Document sources: where the text of a corpus comes from.

A source yields documents (``str``) in a deterministic order, independent of the file system's
listing order. Supported kinds and their spec strings (:func:`parse_source`):

``pystdlib``
    The embedded default corpus (:mod:`hyperbit.data.pystdlib`): one document per standard-library
    ``.py`` file, with its own train/val split (CRC-32 of the relative path).
``text:PATH`` (or an existing file)
    One UTF-8 text file. Documents per ``sample_by`` (default ``"paragraph"``: blocks separated by
    blank lines; ``"line"``: each non-blank line; ``"document"``: the whole file).
``dir:PATH`` (or an existing directory)
    Every file under ``PATH`` matching ``pattern`` (default ``**/*.txt``), sorted by relative POSIX
    path; one document per file unless ``sample_by`` says otherwise.
``glob:PATTERN`` (or a path containing ``*``, ``?`` or ``[``)
    Every file matching a (recursive) glob pattern, sorted by path; one document per file.
``jsonl:PATH`` (or an existing file ending in ``.jsonl``)
    JSON Lines: one JSON object per line, the document is its ``text_field`` (default ``"text"``).
    Blank lines are skipped; a line that is not a JSON object with a string field is an error that
    names ``file:line``.
``hf:PATH`` (or a directory written by ``datasets``' ``save_to_disk``)
    A Hugging Face dataset on local disk, loaded with ``datasets.load_from_disk``; the document is
    the ``text_field`` column. For a ``DatasetDict``, ``hf_split`` picks the split (default:
    ``"train"`` when present, else the only split). ``datasets`` is optional and imported lazily.

Text that is not UTF-8 (``text``, ``dir``, ``glob`` files and ``jsonl`` lines), per
``decode_errors``: ``"strict"`` (default) stops with one line naming the file (and line) and the
byte offset of the first invalid byte; ``"replace"`` decodes invalid bytes as U+FFFD; ``"skip"``
leaves out the whole file (``jsonl``: the line) and goes on. A :class:`DecodeStats` passed to
:func:`iter_documents` counts what was replaced or skipped. ``pystdlib`` always decodes with
replacement and ``hf`` datasets hold decoded strings, so neither uses the option.

Empty documents are skipped everywhere. ``max_bytes`` stops a source once the UTF-8 size of the
documents yielded so far reaches it (the document that crosses the limit is yielded whole).
Every problem with the input raises :class:`DataError` with a one-line message.

Train/validation split for every kind but ``pystdlib`` (:func:`is_val_document`): the document with
index ``i`` (0-based, in source order, counting only yielded non-empty documents) is a validation
document when the first 8 bytes of ``blake2b(i as 8-byte little-endian)``, read as a little-endian
integer and divided by 2**64, are below ``val_fraction``. The rule depends only on the index, so it
is the same on every machine and run, and the fraction of validation documents converges to
``val_fraction``.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError
from .pystdlib import pystdlib_files

KINDS = ("pystdlib", "text", "dir", "glob", "jsonl", "hf")
SAMPLE_BY = ("document", "paragraph", "line")
SPLITS = ("train", "val")
DECODE_ERRORS = ("strict", "replace", "skip")
_MAX_EXAMPLES = 10  # skipped/replaced places DecodeStats remembers
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Source:
    """A parsed source spec. ``path`` is the file, directory or glob pattern (None for pystdlib)."""

    kind: str
    path: str | None = None
    pattern: str = "**/*.txt"  # dir: which files
    text_field: str = "text"  # jsonl, hf: which field/column holds the text
    sample_by: str | None = None  # text/dir/glob: None = "paragraph" for text, "document" otherwise
    hf_split: str | None = None  # hf: split of a DatasetDict
    max_bytes: int | None = None  # stop after about this many UTF-8 bytes of documents
    decode_errors: str = "strict"  # text/dir/glob/jsonl: "strict", "replace" or "skip"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown source kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.kind != "pystdlib" and not self.path:
            raise DataError(f"source kind {self.kind!r} needs a path")
        if self.sample_by is not None and self.sample_by not in SAMPLE_BY:
            raise DataError(f"sample_by={self.sample_by!r} is not allowed; choose one of {list(SAMPLE_BY)}")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            raise DataError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if not self.text_field:
            raise DataError("text_field must be a non-empty field name")
        if self.decode_errors not in DECODE_ERRORS:
            raise DataError(f"decode_errors={self.decode_errors!r} is not allowed; "
                            f"choose one of {list(DECODE_ERRORS)}")

    @property
    def effective_sample_by(self) -> str:
        if self.sample_by is not None:
            return self.sample_by
        return "paragraph" if self.kind == "text" else "document"

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for ``meta.json``): the fields that matter for this kind."""
        d: dict[str, Any] = {"kind": self.kind}
        if self.path is not None:
            d["path"] = self.path if self.kind == "glob" else str(Path(self.path).resolve())
        if self.kind == "dir":
            d["pattern"] = self.pattern
        if self.kind in ("text", "dir", "glob"):
            d["sample_by"] = self.effective_sample_by
        if self.kind in ("jsonl", "hf"):
            d["text_field"] = self.text_field
        if self.kind == "hf" and self.hf_split is not None:
            d["hf_split"] = self.hf_split
        if self.max_bytes is not None:
            d["max_bytes"] = self.max_bytes
        return d


@dataclass
class DecodeStats:
    """What ``decode_errors`` did while a source was read: files and ``jsonl`` lines skipped or
    decoded with U+FFFD replacements, and the first few places (``file[:line] (byte offset N)``)."""

    skipped_files: int = 0
    skipped_lines: int = 0
    replaced_files: int = 0
    replaced_lines: int = 0
    examples: list[str] = field(default_factory=list)

    def count(self, what: str, where: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(where)

    def describe(self, mode: str) -> dict[str, Any]:
        """JSON-able counts (for ``meta.json``), with the mode they were read with."""
        return {"mode": mode, "skipped_files": self.skipped_files, "skipped_lines": self.skipped_lines,
                "replaced_files": self.replaced_files, "replaced_lines": self.replaced_lines,
                "examples": list(self.examples)}


def parse_source(spec: str | Path | Source, **options: Any) -> Source:
    """A :class:`Source` from a spec string (see the module docstring) plus keyword options
    (``pattern``, ``text_field``, ``sample_by``, ``hf_split``, ``max_bytes``, ``decode_errors``;
    None values are ignored). A spec without an explicit ``kind:`` prefix must name an existing
    path or a glob."""
    names = {f.name for f in dataclasses.fields(Source)} - {"kind", "path"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise DataError(f"unknown source option {unknown[0]!r}; choose from {sorted(names)}")
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(spec, Source):
        return dataclasses.replace(spec, **options)
    if not isinstance(spec, (str, Path)):
        raise DataError(f"a source spec must be a string or path, got {type(spec).__name__}")
    text = str(spec)
    if text == "pystdlib":
        return Source("pystdlib", **options)
    kind, sep, rest = text.partition(":")
    if sep and kind in KINDS and kind != "pystdlib":
        return Source(kind, rest, **options)
    if not text:
        raise DataError("empty source spec")
    path = Path(text)
    if path.is_dir():
        if any((path / m).is_file() for m in _HF_MARKERS):
            return Source("hf", text, **options)
        return Source("dir", text, **options)
    if path.is_file():
        return Source("jsonl" if path.suffix == ".jsonl" else "text", text, **options)
    if _GLOB_CHARS.search(text):
        return Source("glob", text, **options)
    raise DataError(f"no such file or directory: {text}")


def is_val_document(index: int, val_fraction: float) -> bool:
    """The split rule of every source but pystdlib (see the module docstring)."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(int(index).to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def iter_documents(spec: str | Path | Source, split: str | None = None, val_fraction: float = 0.0,
                   stats: DecodeStats | None = None, **options: Any) -> Iterator[str]:
    """The documents of a source, in its deterministic order.

    ``split`` None yields every document (for pystdlib: the train split). ``"train"``/``"val"``
    yields one split: pystdlib uses its own CRC-32 rule, every other kind :func:`is_val_document`
    with ``val_fraction``. ``stats`` (optional) counts what ``decode_errors`` replaced or skipped.
    Raises :class:`DataError` when the source yields no document at all.
    """
    source = parse_source(spec, **options)
    if split is not None and split not in SPLITS:
        raise DataError(f"split={split!r} is not allowed; choose one of {list(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = 0
    total = 0
    stats = DecodeStats() if stats is None else stats
    for index, doc in enumerate(_raw_documents(source, split or "train", stats)):
        count += 1
        if split is None or source.kind == "pystdlib" or is_val_document(index, val_fraction) == (split == "val"):
            yield doc
        if source.max_bytes is not None:
            total += len(doc.encode("utf-8", "replace"))
            if total >= source.max_bytes:
                break
    if count == 0:
        skipped = stats.skipped_files + stats.skipped_lines
        because = f" ({skipped} not UTF-8, skipped)" if skipped else ""
        raise DataError(f"empty corpus: {describe_source(source)} has no non-empty documents{because}")


def describe_source(source: Source) -> str:
    return "pystdlib" if source.kind == "pystdlib" else f"{source.kind}:{source.path}"


# --- the kinds ----------------------------------------------------------------------------------


def _raw_documents(source: Source, pystdlib_split: str, stats: DecodeStats) -> Iterator[str]:
    """Non-empty documents, before ``max_bytes`` and the split rule."""
    if source.kind == "pystdlib":
        for path in pystdlib_files(pystdlib_split):
            doc = path.read_bytes().decode("utf-8", errors="replace")
            if doc:
                yield doc
        return
    if source.kind == "jsonl":
        yield from _jsonl_documents(Path(source.path), source.text_field, source.decode_errors, stats)
        return
    if source.kind == "hf":
        yield from _hf_documents(source)
        return
    for path in _text_files(source):
        text = _read_text(path, source.decode_errors, stats)
        if text is not None:
            yield from _split_text(text, source.effective_sample_by)


def _text_files(source: Source) -> list[Path]:
    if source.kind == "text":
        path = Path(source.path)
        if not path.is_file():
            raise DataError(f"no such file: {path}")
        return [path]
    if source.kind == "dir":
        root = Path(source.path)
        if not root.is_dir():
            raise DataError(f"no such directory: {root}")
        files = [p for p in root.glob(source.pattern) if p.is_file()]
        if not files:
            raise DataError(f"empty corpus: no files match {source.pattern!r} in {root}")
        return sorted(files, key=lambda p: p.relative_to(root).as_posix())
    files = [Path(p) for p in globlib.glob(source.path, recursive=True)]
    files = [p for p in files if p.is_file()]
    if not files:
        raise DataError(f"empty corpus: no files match the glob {source.path!r}")
    return sorted(files, key=lambda p: p.as_posix())


_STRICT_HINT = "set decode_errors to 'replace' or 'skip' to read it anyway"


def _read_text(path: Path, errors: str, stats: DecodeStats) -> str | None:
    """The file's text; None when it is not UTF-8 and ``errors`` is ``"skip"``."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path} (byte offset {e.start})"
        if errors == "strict":
            raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); {_STRICT_HINT}") from None
    if errors == "skip":
        stats.count("skipped_files", where)
        return None
    stats.count("replaced_files", where)
    return data.decode("utf-8", errors="replace")


def _split_text(text: str, sample_by: str) -> Iterator[str]:
    text = text.replace("\r\n", "\n") if sample_by != "document" else text
    if sample_by == "document":
        pieces = [text]
    elif sample_by == "line":
        pieces = [line.rstrip("\r") for line in text.split("\n")]
        pieces = [p for p in pieces if p.strip()]
    else:
        pieces = [p.lstrip("\n").rstrip() for p in _BLANK_LINES.split(text)]
    for p in pieces:
        if p:
            yield p


def _jsonl_documents(path: Path, field: str, errors: str, stats: DecodeStats) -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    offset = 0  # of the line in the file, in bytes
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{path}:{lineno} (byte offset {start + e.start})"
                if errors == "strict":
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (invalid byte at offset "
                                    f"{start + e.start}); {_STRICT_HINT}") from None
                if errors == "skip":
                    stats.count("skipped_lines", where)
                    continue
                stats.count("replaced_lines", where)
                line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if field not in obj:
                raise DataError(f"{path}:{lineno}: no field {field!r} (fields: {sorted(obj)[:10]})")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            if text:
                yield text


def _hf_documents(source: Source) -> Iterator[str]:
    path = Path(source.path)
    if not path.is_dir():
        raise DataError(f"no such directory: {path}")
    try:
        import datasets
    except ImportError:
        raise DataError("the hf source needs the 'datasets' package: install datasets "
                        "(pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a non-dataset dir
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({msg})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = source.hf_split
        if name is None:
            name = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
        if name is None or name not in ds:
            raise DataError(f"{path}: choose a split with hf_split; available: {splits}")
        ds = ds[name]
    elif source.hf_split is not None:
        raise DataError(f"{path}: hf_split={source.hf_split!r} given but the dataset has no splits")
    field = source.text_field
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {ds.column_names})")
    row = 0
    for chunk in ds.select_columns([field]).iter(batch_size=1000):
        for text in chunk[field]:
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column {field!r} is {type(text).__name__}, not a string")
            row += 1
            if text:
                yield text

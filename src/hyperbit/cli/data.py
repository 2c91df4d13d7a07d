"""``hyperbit prepare``: tokenise a corpus once into token shards."""

from __future__ import annotations

import argparse

from ..data import DataError, prepare
from ..data.sources import DECODE_ERRORS


def add_parsers(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise a corpus once into token shards")
    p.add_argument("source", help="pystdlib, a text file, a dir, a glob, a .jsonl file or a HF dataset dir "
                                  "(or kind:PATH)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE",
                   help="byte (default), bpe (trained here on the train split) or a saved tokenizer file")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents for validation (default 0.01; pystdlib has its own split)")
    p.add_argument("--text-field", help="JSON Lines / HF dataset text field (default text)")
    p.add_argument("--sample-by", choices=("document", "paragraph", "line"),
                   help="text/dir/glob: what one document is")
    p.add_argument("--pattern", help="dir: which files (default **/*.txt)")
    p.add_argument("--max-bytes", type=int, help="stop reading the corpus after about this many bytes")
    p.add_argument("--decode-errors", choices=DECODE_ERRORS, default="strict",
                   help="text that is not UTF-8: strict (default: stop, naming the file and byte offset), "
                        "replace (invalid bytes become U+FFFD) or skip (leave the file, or JSON Lines line, "
                        "out and count it in meta.json)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    p.set_defaults(fn=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        meta = prepare(args.source, args.out_dir, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, max_bytes=args.max_bytes, overwrite=args.overwrite,
                       text_field=args.text_field, sample_by=args.sample_by, pattern=args.pattern,
                       decode_errors=args.decode_errors)
    except OSError as e:
        raise DataError.from_os_error(e) from None
    tok, vocab, docs, tokens = meta["tokenizer"], meta["vocab_size"], meta["documents"], meta["tokens"]
    print(f"prepared {args.out_dir}: train {tokens['train']:,} tokens ({docs['train']:,} documents), "
          f"val {tokens['val']:,} tokens ({docs['val']:,} documents); {tok['kind']} tokenizer, "
          f"vocab {vocab:,}, {meta['dtype']} shards")
    dec = meta["decode_errors"]
    for what in ("skipped", "replaced"):
        files, lines = dec[f"{what}_files"], dec[f"{what}_lines"]
        if files or lines:
            first = f"; first: {dec['examples'][0]}" if dec["examples"] else ""
            print(f"not UTF-8, {what} ({'invalid bytes as U+FFFD' if what == 'replaced' else 'left out'}): "
                  f"{files:,} files, {lines:,} JSON Lines lines{first} (see meta.json)")
    print(f"train on it: hyperbit train data.path={args.out_dir} model.vocab_size={vocab}")
    return 0

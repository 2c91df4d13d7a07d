"""``hyperbit export``: write a checkpoint's model in another format (``packed``: 2-bit ternary)."""

from __future__ import annotations

import argparse

from ..runs import EXPORT_FORMATS, export_run


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model in another format (packed, ...)")
    p.add_argument("checkpoint", metavar="CKPT", help="run dir, its checkpoints/ dir or a step dir")
    p.add_argument("out", metavar="OUT", help="new directory to write (must not exist)")
    p.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS),
                   help="packed: 2-bit ternary codes + scales, loadable by eval / generate")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer file (default: the one the run was trained with)")
    p.set_defaults(fn=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.checkpoint, args.format, args.out, tokenizer=args.tokenizer)
    print(f"wrote {out} ({args.format})")
    return 0

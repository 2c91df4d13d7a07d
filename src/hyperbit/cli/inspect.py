"""``hyperbit inspect``: what a checkpoint's pathway learned, as plots and a JSON summary."""

from __future__ import annotations

import argparse
import json

from ..reports.inspect import human_summary, inspect_checkpoint
from .common import checkpoint_args


def add_parsers(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint's pathway learned: plots and a JSON summary")
    checkpoint_args(p)
    p.add_argument("--out", metavar="DIR",
                   help="report directory (default: <run>/inspect/step-<N>)")
    p.add_argument("--data", metavar="DIR",
                   help="a prepared dir whose val split to read (default: the run's own data)")
    p.add_argument("--batch-size", type=int, default=8, help="validation windows to analyse (default 8)")
    p.add_argument("--seq", type=int, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--json", action="store_true", help="print the JSON summary to stdout")
    p.set_defaults(fn=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Write the report, then print a short summary (or the JSON)."""
    summary = inspect_checkpoint(args.checkpoint, out=args.out, data=args.data, batch_size=args.batch_size,
                                 seq=args.seq, device=args.device, tokenizer=args.tokenizer)
    print(json.dumps(summary) if args.json else human_summary(summary))
    return 0

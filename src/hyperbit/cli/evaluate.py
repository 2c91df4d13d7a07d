"""``hyperbit eval``: validation loss and bits per byte of a checkpoint."""

from __future__ import annotations

import argparse
import json

from ..runs import evaluate_checkpoint
from ..train.precision import PRECISIONS
from .common import checkpoint_args


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and bits/byte of a checkpoint")
    checkpoint_args(p)
    p.add_argument("--data", metavar="SPEC|DIR",
                   help="a prepared dir (its val split), or a raw corpus spec tokenised with the "
                        "checkpoint's tokenizer into a temporary dir and evaluated whole (or its val "
                        "split with --val-fraction F); default: the run's own val split")
    p.add_argument("--split", choices=("train", "val"), help="which split to evaluate")
    p.add_argument("--val-fraction", type=float, help="raw corpus: hold out this fraction, evaluate it")
    p.add_argument("--text-field", help="raw JSON Lines / HF corpus: the text field")
    p.add_argument("--max-bytes", type=int, help="raw corpus: read about this many bytes")
    p.add_argument("--batches", type=int,
                   help="batches to evaluate (default: the run's train.eval_batches; 0 = the whole split)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: the run's micro-batch)")
    p.add_argument("--seq", type=int, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default auto: bf16 where this device computes it natively, else fp32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    report = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, batches=args.batches,
                                 batch_size=args.batch_size, seq=args.seq, precision=args.precision,
                                 device=args.device, tokenizer=args.tokenizer,
                                 val_fraction=args.val_fraction, text_field=args.text_field,
                                 max_bytes=args.max_bytes)
    if args.json:
        print(json.dumps(report))
    elif "val_acc" in report:  # a vision transformer
        print(f"step {report['step']} on {report['data']} (test split, {report['images']:,} images): "
              f"loss {report['val_loss']:.4f}, accuracy {report['val_acc']:.4f}  [{report['checkpoint']}]")
    else:
        what = "val loss" if report["split"] == "val" else "loss"
        print(f"step {report['step']} on {report['data']} ({report['split']} split, {report['tokens']:,} "
              f"tokens): {what} {report['val_loss']:.4f}, {report['val_bpb']:.4f} bits/byte  "
              f"[{report['checkpoint']}]")
    return 0

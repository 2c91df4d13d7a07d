"""``hyperbit import``: a Hugging Face ``bitnet`` checkpoint directory as a new run directory."""

from __future__ import annotations

import argparse

from ..interop.hf_import import import_bitnet


def add_parsers(sub) -> None:
    p = sub.add_parser("import", help="read a Hugging Face bitnet checkpoint into a new run directory")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json (model_type bitnet) "
                   "and model.safetensors")
    p.add_argument("--out", required=True, help="new run directory (must not exist or be empty)")
    p.add_argument("--tokenizer", metavar="byte|FILE",
                   help="tokenizer of the run (default: HF_DIR/tokenizer.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="train.* / data.* settings of the run, e.g. data.path=corpus/ train.steps=100")
    p.set_defaults(fn=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    step_dir = import_bitnet(args.hf_dir, args.out, args.overrides, tokenizer=args.tokenizer)
    print(f"wrote {args.out} (checkpoint {step_dir})")
    return 0

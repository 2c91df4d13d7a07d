"""``hyperbit <command>``: model inspection, training and analysis from the command line.

    hyperbit config [--preset NAME] [key=value ...]   print the resolved model config as JSON
    hyperbit params [--preset NAME] [key=value ...]   parameter counts (built on the meta device)
    hyperbit wiring [--preset NAME] [key=value ...]   build the model and run the wiring check
    hyperbit train [--preset NAME] [--out DIR] [--resume] [--overwrite] [--dry-run]
                   [section.key=value ...]             train (model.*, train.*, data.* overrides)
    hyperbit prepare SOURCE OUT_DIR [--tokenizer byte|bpe|FILE] [--vocab-size N] [--val-fraction F]
                   [--text-field NAME] [--max-bytes N] [--overwrite]   tokenise a corpus into shards
    hyperbit eval CKPT [--data SPEC|PREPARED_DIR] [--batches N] [--seq N] [--json]
                                                       validation loss and bits/byte of a checkpoint
    hyperbit generate CKPT --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K]
                   [--top-p P] [--seed S] [--no-cache] continue a prompt with a trained model
    hyperbit compare [--preset NAME] [--out DIR] [--arms A,B,...] [--seeds N|LIST] [--axis K=V1,V2]
                   [--tokens N] [--baseline ARM] [--report-only] [section.key=value ...]
                                                       train a grid of runs, then write a report
    hyperbit inspect CKPT [--out DIR] [--data DIR] [--batch-size N] [--seq N] [--json]
                                                       plots + JSON: connection matrix, collapse, gain

CKPT is a run directory (its latest checkpoint), its checkpoints/ directory or one step directory.

Bad input (configs, paths, data, checkpoints) ends in one line on stderr and exit code 2; a run
stopped by a non-finite loss exits with 3 and keeps its last good checkpoint.

Each command is a small module here that only parses its arguments and calls the library function
that does the work (``hyperbit.train.train``, ``hyperbit.runs.evaluate_checkpoint``, ...).
"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..data import DataError
from ..train.errors import CheckpointError, TrainingStopped
from . import compare, data, evaluate, generate, inspect, model, train

COMMANDS = (model, train, data, evaluate, generate, compare, inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"hyperbit: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"hyperbit: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("hyperbit: interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]

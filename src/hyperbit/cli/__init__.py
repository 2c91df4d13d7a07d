"""``hyperbit <command>``: model inspection, training and analysis from the command line.

    hyperbit config [--preset NAME] [key=value ...]   print the resolved model config as JSON
    hyperbit params [--preset NAME] [key=value ...]   parameter counts (built on the meta device)
    hyperbit wiring [--preset NAME] [key=value ...]   build the model and run the wiring check
    hyperbit train [--preset NAME] [--out DIR] [--resume] [--overwrite] [--dry-run]
                   [section.key=value ...]             train (model.*, train.*, data.* overrides)
    hyperbit prepare SOURCE OUT_DIR [--tokenizer byte|bpe|FILE] [--vocab-size N] [--val-fraction F]
                   [--text-field NAME] [--max-bytes N] [--decode-errors strict|replace|skip]
                   [--overwrite]                       tokenise a corpus into shards
    hyperbit eval CKPT [--data SPEC|PREPARED_DIR] [--batches N] [--seq N] [--json]
                                                       validation loss and bits/byte of a checkpoint
    hyperbit generate CKPT --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K]
                   [--top-p P] [--seed S] [--no-cache] continue a prompt with a trained model
    hyperbit compare [--preset NAME] [--out DIR] [--arms A,B,...] [--seeds N|LIST] [--axis K=V1,V2]
                   [--tokens N] [--baseline ARM] [--report-only] [section.key=value ...]
                                                       train a grid of runs, then write a report
    hyperbit inspect CKPT [--out DIR] [--data DIR] [--batch-size N] [--seq N] [--json]
                                                       plots + JSON: connection matrix, collapse, gain

    hyperbit export CKPT OUT --format packed          write the model in another format to a new dir
    hyperbit import HF_DIR --out RUN [--tokenizer byte|FILE] [train.*|data.*=value ...]
                                                       a Hugging Face bitnet checkpoint as a new run

CKPT is a run directory (its latest checkpoint), its checkpoints/ directory or one step directory;
eval and generate also take a packed directory (``hyperbit export --format packed``).

    hyperbit presets                                   list the run and model presets

Overrides (``section.key=value``) may stand anywhere on the line. Exit codes: 0 success; 1 a
failed check (``params``, ``wiring``); 2 bad input (configs, paths, data, checkpoints: one line on
stderr); 3 a run stopped by a non-finite loss (its last good checkpoint is kept); 130 / 143 a run
stopped by Ctrl-C / SIGTERM (after saving a checkpoint at the end of the current step).

Each command is a small module here that only parses its arguments and calls the library function
that does the work (``hyperbit.train.train``, ``hyperbit.runs.evaluate_checkpoint``, ...).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .._version import __version__
from ..config import ConfigError
from ..data import DataError
from ..train.distributed import launched
from ..train.errors import CheckpointError, TrainingInterrupted, TrainingStopped
from . import compare, data, evaluate, export, generate, import_, inspect, model, presets, train

COMMANDS = (model, train, data, evaluate, generate, export, import_, compare, inspect, presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperbit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hyperbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``section.key=value`` overrides may stand after options too."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """The ``hyperbit`` command; returns its exit code. As a ``torchrun`` worker's program
    (``argv`` None, under a launcher) the process ends right here, see :func:`_end_worker`."""
    code = _run(argv)
    if argv is None and launched():
        _end_worker(code)
    return code


def _end_worker(code: int) -> None:
    """End a ``torchrun`` worker once its work is done and its process group destroyed: flush
    and ``os._exit``, skipping interpreter shutdown. There, static destructors of the distributed
    runtime occasionally abort a finished worker ("terminate called without an active
    exception", seen about once in a hundred 2-process gloo runs); the launcher would then report
    the whole run failed and stop the other ranks."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    args = parse(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"hyperbit: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"hyperbit: training stopped: {e} (exit code 3)", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        print(f"hyperbit: {_interrupted(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("hyperbit: interrupted", file=sys.stderr)
        return 130


def _interrupted(e: TrainingInterrupted, out: str | None) -> str:
    name = signal.Signals(e.signum).name
    if e.checkpoint is None:
        return f"interrupted ({name}) before the first step; nothing to keep"
    again = f"hyperbit train --out {out} --resume" if out else "hyperbit train --out RUN --resume"
    return f"interrupted ({name}) at step {e.step}; checkpoint saved to {e.checkpoint}; continue with: {again}"


__all__ = ["build_parser", "main"]

"""Arguments several commands share."""

from __future__ import annotations

import argparse


def checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="run dir, its checkpoints/ dir or a step dir")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer file (default: the one the run was trained with)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="default: the run's train.device (auto = CUDA when available)")

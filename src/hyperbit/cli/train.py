"""``hyperbit train``: train a model into a run directory (resumable)."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import ConfigError, ModelConfig
from ..data import DataConfig
from ..train import RUN_PRESETS, TrainConfig, resolve_run_config, train
from ..train.rundir import RESUMABLE, resume_config


def _keys_help() -> str:
    lines = ["override keys (section.key=value, anywhere on the line; defaults in brackets):"]
    for section, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
        keys = [f"{section}.{f.name} [{f.default}]" for f in dataclasses.fields(cls)]
        lines.append("  " + ", ".join(keys))
    lines.append("with --resume only these may differ from the saved run: " + ", ".join(sorted(RESUMABLE)))
    return "\n".join(lines)


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumable)", epilog=_keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="start from a named run preset "
                   "(`hyperbit presets` lists them)")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: its saved config, with the overrides on top")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="e.g. model.pathway=hc model.expansion_rate=4 train.lr=3e-3 data.path=corpus/")
    p.set_defaults(fn=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    out = args.out = args.out or f"runs/{args.preset or 'default'}"
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    if args.resume and not args.preset:  # the saved run, with the overrides on top
        cfg = resume_config(out, args.overrides) if args.overrides or args.dry_run else None
    else:
        cfg = resolve_run_config(args.preset, args.overrides)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if "val_bpb" in result:
        print(f"done: step {result['step']}, train loss {result['loss']:.4f}, "
              f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte -> {out}")
    elif "loss" in result:
        print(f"done: step {result['step']}, train loss {result['loss']:.4f} -> {out}")
    return 0

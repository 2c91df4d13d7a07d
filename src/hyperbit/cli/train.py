"""``hyperbit train``: train a model into a run directory (resumable)."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from ..train import RUN_PRESETS, resolve_run_config, train


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumable)")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="start from a named run preset")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="e.g. model.pathway=hc model.expansion_rate=4 train.lr=3e-3 data.path=corpus/")
    p.set_defaults(fn=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    bare_resume = args.resume and not args.preset and not args.overrides
    cfg = None if bare_resume else resolve_run_config(args.preset, args.overrides)
    if args.dry_run:
        if cfg is None:
            raise ConfigError("--dry-run needs a preset or overrides (a bare --resume uses the run's config)")
        print(cfg.to_json())
        return 0
    out = args.out or f"runs/{args.preset or 'default'}"  # --resume alone: the run's own config
    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if "val_bpb" in result:
        print(f"done: step {result['step']}, train loss {result['loss']:.4f}, "
              f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte -> {out}")
    return 0

"""``hyperbit <command>``: model inspection from the command line.

    hyperbit config [--preset NAME] [key=value ...]   print the resolved model config as JSON
    hyperbit params [--preset NAME] [key=value ...]   parameter counts (built on the meta device)
    hyperbit wiring [--preset NAME] [key=value ...]   build the model and run the wiring check
    hyperbit train [--preset NAME] [--out DIR] [--resume] [--overwrite] [--dry-run]
                   [section.key=value ...]             train (model.*, train.*, data.* overrides)

Bad input (configs, paths, data, checkpoints) ends in one line on stderr and exit code 2; a run
stopped by a non-finite loss exits with 3 and keeps its last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, ConfigError, ModelConfig, parse_overrides, preset


def _config(args: argparse.Namespace) -> ModelConfig:
    cfg = preset(args.preset) if args.preset else ModelConfig()
    return parse_overrides(cfg, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).to_dict(), indent=2))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .models import build_model, count_params, pathway_params

    cfg = _config(args)
    model = build_model(cfg, device="meta")
    total = model.num_params()
    print(f"pathway {cfg.pathway} (n={cfg.streams}), linear {cfg.linear}: {total:,} parameters "
          f"({model.num_params(exclude_embeddings=True):,} without the embedding)")
    print(f"  analytic count {count_params(cfg):,}; connection parameters per branch "
          f"{pathway_params(cfg):,} x {cfg.n_branches} branches")
    return 0 if total == count_params(cfg) else 1


def cmd_wiring(args: argparse.Namespace) -> int:
    import torch

    from .diagnostics import check_wiring
    from .models import build_model

    torch.manual_seed(0)
    report = check_wiring(build_model(_config(args)))
    print(report)
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import resolve_run_config
    from .train.loop import train

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("config", cmd_config, "print the resolved model config"),
                            ("params", cmd_params, "count parameters"),
                            ("wiring", cmd_wiring, "run the wiring check")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
        p.set_defaults(fn=fn)
    from .train.config import RUN_PRESETS

    p = sub.add_parser("train", help="train a model (resumable)")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="start from a named run preset")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="e.g. model.pathway=hc model.expansion_rate=4 train.lr=3e-3 data.path=corpus/")
    p.set_defaults(fn=cmd_train)
    args = parser.parse_args(argv)
    from .data import DataError
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingStopped

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


if __name__ == "__main__":
    sys.exit(main())

"""``hyperbit <command>``: model inspection from the command line.

    hyperbit config [--preset NAME] [key=value ...]   print the resolved model config as JSON
    hyperbit params [--preset NAME] [key=value ...]   parameter counts (built on the meta device)
    hyperbit wiring [--preset NAME] [key=value ...]   build the model and run the wiring check

Bad options end in one line on stderr and exit code 2.
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
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"hyperbit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

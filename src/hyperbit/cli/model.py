"""``hyperbit config | params | wiring``: a model config, its parameter count, its wiring check."""

from __future__ import annotations

import argparse
import json

import torch

from ..analysis import check_wiring
from ..config import PRESETS, ModelConfig, parse_overrides, preset
from ..models import build_model, count_params, pathway_params


def add_parsers(sub) -> None:
    for name, fn, help_ in (("config", cmd_config, "print the resolved model config"),
                            ("params", cmd_params, "count parameters"),
                            ("wiring", cmd_wiring, "run the wiring check")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
        p.set_defaults(fn=fn)


def _config(args: argparse.Namespace) -> ModelConfig:
    cfg = preset(args.preset) if args.preset else ModelConfig()
    return parse_overrides(cfg, args.overrides).resolved()


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).to_dict(), indent=2))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    cfg = _config(args)
    model = build_model(cfg, device="meta")
    total = model.num_params()
    print(f"pathway {cfg.pathway} (n={cfg.expansion_rate}), linear {cfg.linear}: {total:,} parameters "
          f"({model.num_params(exclude_embeddings=True):,} without the embedding)")
    print(f"  analytic count {count_params(cfg):,}; connection parameters per branch "
          f"{pathway_params(cfg):,} x {cfg.n_branches} branches")
    if cfg.ffn == "moe":
        print(f"  active per token {count_params(cfg, active=True):,} (router + top {cfg.moe_top_k} "
              f"of {cfg.moe_experts} experts)")
    return 0 if total == count_params(cfg) else 1


def cmd_wiring(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    report = check_wiring(build_model(_config(args)))
    print(report)
    return 0 if report.ok else 1

"""``hyperbit compare``: train a grid of pathways x axes x seeds, then write a report."""

from __future__ import annotations

import argparse
import shlex

from ..config import ConfigError
from ..reports.compare.grid import DEFAULT_ARMS, compare, parse_axis, parse_seeds
from ..train import RUN_PRESETS


def add_parsers(sub) -> None:
    p = sub.add_parser("compare", help="train a grid of pathways x seeds, then report (resumable)")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="run preset every run starts from")
    p.add_argument("--out", help="grid directory (default runs/compare-<preset>)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help="pathways: prenorm, postnorm, shcN, dhcN, mhcN, mhcN-paper, fracM, sfracM, sequential, "
                        "parallelN "
                        f"(default {','.join(DEFAULT_ARMS)})")
    p.add_argument("--seeds", default="3", help="a count (3 = seeds 0,1,2) or a list 0,5,7 (one seed: 2,) (default 3)")
    p.add_argument("--axis", action="append", default=[], metavar="section.key=V1,V2",
                   help="another grid axis, e.g. --axis train.lr=1e-3,3e-3 (repeatable)")
    p.add_argument("--tokens", type=float,
                   help="training tokens per run (default: the preset's steps x batch x seq)")
    p.add_argument("--baseline", help="the arm differences are measured against (default: the first)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report on the runs so far")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    p.set_defaults(fn=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {args.tokens}")
    report = compare(args.preset, args.overrides, [a.strip() for a in args.arms.split(",") if a.strip()],
                     [parse_axis(a) for a in args.axis], parse_seeds(args.seeds),
                     tokens=int(args.tokens) if args.tokens else None, out=args.out, baseline=args.baseline,
                     report_only=args.report_only, dry_run=args.dry_run,
                     command="hyperbit compare " + shlex.join(args.argv))
    if report is not None:
        print(f"report: {report}")
    return 0

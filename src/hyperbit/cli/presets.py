"""``hyperbit presets``: the run presets (``train --preset``) and model presets (``config``,
``params``, ``wiring --preset``), and what each sets."""

from __future__ import annotations

import argparse

from ..config import PRESETS
from ..train import RUN_PRESETS


def add_parsers(sub) -> None:
    p = sub.add_parser("presets", help="list the run and model presets")
    p.set_defaults(fn=cmd_presets)


def _settings(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def cmd_presets(args: argparse.Namespace) -> int:
    print("run presets (hyperbit train / compare --preset NAME); everything else at its default:")
    for name, sections in RUN_PRESETS.items():
        print(f"  {name}")
        for section, values in sections.items():
            print(f"    {section}: {_settings(values)}")
    print("model presets (hyperbit config / params / wiring --preset NAME; hyperbit.preset(NAME)):")
    for name, values in PRESETS.items():
        print(f"  {name}: {_settings(values)}")
    return 0

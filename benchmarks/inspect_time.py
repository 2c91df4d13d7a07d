"""How long ``hyperbit inspect`` takes on a small checkpoint.

Claim: inspecting a tiny checkpoint takes seconds, not minutes. Target: the whole command, as a
user runs it (``python -m hyperbit.cli inspect RUN``: interpreter start, imports, loading the
checkpoint, the analysis passes, every plot, summary.json), in under 30 s wall on the machine it
runs on.

Method
    * One run is trained first (not timed): ``hyperbit train --preset tiny`` with DHC x2 (the
      pathway with the most to inspect: dynamic weights), ``--steps`` steps, one checkpoint.
    * ``--repeats`` runs of the command in a fresh process, each into a fresh ``--out``; reported:
      the median and the spread of the wall times, next to ``python -c "import torch"`` (the floor
      any command pays) measured the same way, interleaved.
    * The analysis alone, in-process, without the plots: ``hyperbit.analysis.inspect.analyse``
      on the same batch (median of the repeats), to separate the model work from start-up and
      drawing.

    python benchmarks/inspect_time.py                 # full: 5 repeats
    python benchmarks/inspect_time.py --repeats 1     # smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (RESULTS_DIR, finish, fmt, format_table, machine_info, median, setup_paths, source_digest,
                     summarize)

setup_paths()

TARGET_S = 30.0


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="training steps of the inspected run")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "inspect_time.json")
    args = ap.parse_args()

    import torch

    from hyperbit.cli import main as cli
    from hyperbit.data import TokenShards
    from hyperbit.analysis.inspect import analyse
    from hyperbit.runs import find_run_data, load_trained

    info = machine_info()
    digest = source_digest()
    with tempfile.TemporaryDirectory(prefix="hyperbit-bench-inspect-") as tmp:
        run = Path(tmp) / "run"
        rc = cli(["train", "--preset", "tiny", "--out", str(run), "model.pathway=hc", "model.expansion_rate=2",
                  f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0", "train.eval_batches=1"])
        if rc != 0:
            raise SystemExit("training the run to inspect failed")
        command, floor = [], []
        for i in range(args.repeats):  # interleaved: drift hits both alike
            command.append(_wall([sys.executable, "-m", "hyperbit.cli", "inspect", str(run),
                                  "--out", str(Path(tmp) / f"inspect-{i}")]))
            floor.append(_wall([sys.executable, "-c", "import torch"]))

        model, cfg, _, loaded = load_trained(run)
        shards = TokenShards(find_run_data(cfg, run), "val")
        x, y = next(shards.iter_eval_batches(8, cfg.train.seq_len, max_batches=1))
        x, y = x.to(loaded["device"]), y.to(loaded["device"])  # where the model is, as inspect does
        analysis = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            analyse(model, x, y)  # ends with values read back to the host: the device is done
            analysis.append(time.perf_counter() - t0)
        del shards
    info["loadavg_end"] = list(__import__("os").getloadavg())

    rows = [["hyperbit inspect (whole command)", fmt(median(command), ".2f", " s"),
             fmt(min(command), ".2f"), fmt(max(command), ".2f")],
            ['python -c "import torch"', fmt(median(floor), ".2f", " s"), fmt(min(floor), ".2f"),
             fmt(max(floor), ".2f")],
            ["analysis only, in-process", fmt(median(analysis), ".3f", " s"), fmt(min(analysis), ".3f"),
             fmt(max(analysis), ".3f")]]
    print(f"hyperbit inspect on a tiny DHC x2 checkpoint ({cfg.model.n_layers} blocks, d {cfg.model.dim}, "
          f"8 x {cfg.train.seq_len} tokens) on {loaded['device']}, {args.repeats} repeats, torch threads "
          f"{torch.get_num_threads()}")
    print(format_table(["", "median", "min", "max"], rows))
    passed = median(command) < TARGET_S
    targets = [{"description": f"hyperbit inspect wall time / {TARGET_S:.0f} s", "ratio": median(command) / TARGET_S,
                "threshold": 1.0, "passed": passed}]
    finish("inspect_time", info, targets, args.out, quick=args.repeats < 3,
           source_changed=source_digest() != digest,
           settings={"repeats": args.repeats, "steps": args.steps, "model": cfg.model.to_dict(),
                     "batch": [8, cfg.train.seq_len], "device": str(loaded["device"])},
           command_s=summarize(command), import_torch_s=summarize(floor), analysis_s=summarize(analysis))


if __name__ == "__main__":
    main()

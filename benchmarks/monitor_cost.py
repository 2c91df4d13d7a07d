"""What the training monitors cost: one ``pathway_summary`` against the training steps between two.

Claim: the composite-gain and collapse monitors ``hyperbit train`` logs every
``train.monitor_every`` steps are cheap. Target: at the preset's ``monitor_every``, a monitor costs
under 1% of the training time it is spread over, i.e.
``t(monitor) / (monitor_every x t(step)) < 0.01``, for every pathway measured.

Method: the preset's model (``deep`` by default: 16 blocks of width 64), built per pathway; a
training step is the full step ``train()`` runs (forward in the precision ``train.precision=auto``
picks, backward, AdamW step) on
the preset's batch; a monitor is ``hyperbit.analysis.pathway_summary`` under the same autocast
on the two validation-sized windows the loop uses (2 x seq_len tokens), exactly as the loop calls
it. Done for the five default arms of ``hyperbit compare``, so the table also gives each
pathway's training-step time on the preset, measured side by side. Everything is timed
round-robin in one process (``_common.interleaved_timing``: the order rotates every round),
medians over all timed calls.

    python benchmarks/monitor_cost.py                       # deep preset, the five compare arms
    python benchmarks/monitor_cost.py --preset tiny --rounds 2 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _common import (RESULTS_DIR, autocast, finish, fmt, format_table, interleaved_timing, machine_info,
                     make_train_step, median, setup_paths, source_digest, warmup)

setup_paths()

TARGET = 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deep")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed calls of each kind per round")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "monitor_cost.json")
    args = ap.parse_args()

    import torch

    from hyperbit.reports.compare.grid import DEFAULT_ARMS, arm_overrides
    from hyperbit.analysis import pathway_summary
    from hyperbit.models import build_model
    from hyperbit.train import param_groups
    from hyperbit.train import resolve_run_config

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    digest = source_digest()
    fns, configs = {}, {}
    for name in DEFAULT_ARMS:  # the arms of `hyperbit compare`: the step times are a by-product
        cfg = resolve_run_config(args.preset, arm_overrides(name))
        t = cfg.train
        torch.manual_seed(0)
        model = build_model(cfg.model)
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
        vocab = cfg.model.vocab_size
        idx = torch.randint(0, vocab, (t.batch_size // t.grad_accum, t.seq_len))
        fns[f"{name}/step"] = make_train_step(model, optimizer, idx, torch.roll(idx, -1, 1), "cpu")
        window = torch.randint(0, vocab, (2, t.seq_len))

        def monitor(model=model, window=window):
            with autocast("cpu"):
                pathway_summary(model, window)

        fns[f"{name}/monitor"] = monitor
        configs[name] = {"model": cfg.model.to_dict(), "monitor_every": t.monitor_every,
                         "batch": [t.batch_size // t.grad_accum, t.seq_len], "monitor_batch": [2, t.seq_len]}
    warmup(fns, 1)
    times = interleaved_timing(fns, args.rounds, args.steps)
    info["loadavg_end"] = list(os.getloadavg())

    rows, results, targets = [], {}, []
    for name, c in configs.items():
        step = median(t for rnd in times[f"{name}/step"] for t in rnd)
        mon = median(t for rnd in times[f"{name}/monitor"] for t in rnd)
        every = c["monitor_every"] or 1
        share = mon / (every * step)
        results[name] = {**c, "step_ms": step * 1e3, "monitor_ms": mon * 1e3, "monitor_share": share,
                         "raw_s": {"step": times[f"{name}/step"], "monitor": times[f"{name}/monitor"]}}
        rows.append([name, fmt(step * 1e3, ".1f"), fmt(mon * 1e3, ".1f"), fmt(mon / step, ".2f", "x"),
                     str(c["monitor_every"]), fmt(100 * share, ".3f", "%")])
        targets.append({"description": f"monitor share of training time ({name}) / {TARGET:.0%}",
                        "ratio": share / TARGET, "threshold": 1.0, "passed": share < TARGET})
    print(f"training monitors vs training steps, preset {args.preset}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} calls")
    print(format_table(["pathway", "step ms", "monitor ms", "monitor/step", "every", "share"], rows))
    finish("monitor_cost", info, targets, args.out, quick=args.rounds < 3,
           source_changed=source_digest() != digest,
           settings={"preset": args.preset, "rounds": args.rounds, "steps": args.steps}, pathways=results)


if __name__ == "__main__":
    main()

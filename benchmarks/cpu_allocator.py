"""Training steps on the CPU with and without the allocator settings ``hyperbit train`` applies.

Claim checked: with glibc's freed memory kept for the next step
(``hyperbit.train.allocator.keep_freed_memory``), a training step faults in at most 0.1x the
pages it does with glibc as it is, and takes no longer (paired median ratio <= 1.0), for every
model measured.

Method: one process per (model, setting), as ``hyperbit train`` runs one model per process; the
settings alternate between adjacent processes (``HYPERBIT_MALLOC_TUNING`` 1 and 0), the order
flipping every pair, so a slow drift of a shared machine hits both alike. Each process builds the
model of ``train_throughput.py --models`` (d 256 x 6 blocks, batch 8 x seq 256, the precision
``train.precision=auto`` picks, ``torch.optim.AdamW``), runs warm-up steps, then times ``--steps``
steps and reads its minor page faults and system time (``getrusage``) over them. Reported per
model and setting: medians over pairs of step ms, faults per step and system ms per step, and the
median over pairs of the step ratio kept / default.

    python benchmarks/cpu_allocator.py                         # prenorm, dhc4, mhc4; 5 pairs
    python benchmarks/cpu_allocator.py --models dhc4 --pairs 9
    python benchmarks/cpu_allocator.py --quick
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

from hyperbit.train.allocator import ENV, keep_freed_memory  # noqa: E402

SETTINGS = {"kept": "1", "default": "0"}
MAX_FAULTS = 0.1  # kept / default, faults per step
MAX_STEP = 1.0  # kept / default, step time (paired median)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="prenorm,dhc4,mhc4", help=f"comma list of {','.join(C.STEP_MODELS)}")
    ap.add_argument("--pairs", type=int, default=5, help="process pairs per model (default 5)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per process (default 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each process")
    ap.add_argument("--quick", action="store_true", help="the tiny shape, 1 pair of 2 steps")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/cpu_allocator.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.warmup = 1, 2, 1
    bad = [m for m in args.models.split(",") if m not in C.STEP_MODELS]
    if bad or not args.models:
        ap.error(f"unknown models {bad}; choose from {list(C.STEP_MODELS)}")
    return args


def shape(quick: bool) -> dict[str, int]:
    from train_throughput import MODEL_SHAPE, MODEL_SHAPE_QUICK

    return MODEL_SHAPE_QUICK if quick else MODEL_SHAPE


def child(args) -> None:
    """One process: the setting (as train() applies it, before the model), the model, the steps."""
    kept = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = shape(args.quick)
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, s["vocab_size"], (s["batch"], s["seq_len"]), generator=g) for _ in range(2))
    model = C.build_step_model(args.child, s, "cpu", compiled=False, fused_hc=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = C.make_train_step(model, opt, idx, targets, "cpu")  # the precision train.precision=auto picks
    C.warmup({"m": step}, args.warmup)
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    C.report_to_parent({"kept": kept, "step_s": C.median(times),
                        "faults": (after.ru_minflt - before.ru_minflt) / args.steps,
                        "sys_s": (after.ru_stime - before.ru_stime) / args.steps})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    info = C.machine_info("cpu")
    models = args.models.split(",")
    base = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    base += ["--quick"] * args.quick + (["--threads", str(args.threads)] if args.threads else [])
    runs: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in SETTINGS} for m in models}
    for p in range(args.pairs):
        for m in models:
            for setting in (SETTINGS if p % 2 == 0 else reversed(SETTINGS)):
                env = {**os.environ, ENV: SETTINGS[setting]}
                runs[m][setting].append(C.run_json_child([*base, "--child", m], env=env))
            print(f"  pair {p + 1}/{args.pairs} {m}: kept {runs[m]['kept'][-1]['step_s'] * 1e3:.1f} ms, default "
                  f"{runs[m]['default'][-1]['step_s'] * 1e3:.1f} ms", flush=True)
    rows, summary, targets = [], {}, []
    for m in models:
        r = runs[m]
        med = {k: {q: C.median(x[q] for x in r[k]) for q in ("step_s", "faults", "sys_s")} for k in SETTINGS}
        paired = C.median(a["step_s"] / b["step_s"] for a, b in zip(r["kept"], r["default"]))
        faults = C.ratio(med["kept"]["faults"], med["default"]["faults"])
        summary[m] = {"median": med, "step_ratio_paired": paired, "fault_ratio": faults,
                      "applied": all(x["kept"] for x in r["kept"]), "runs": r}
        for k in SETTINGS:
            rows.append([C.STEP_MODELS[m][0], k, C.fmt(med[k]["step_s"] * 1e3, ".1f"), C.fmt(med[k]["faults"], ".0f"),
                         C.fmt(med[k]["sys_s"] * 1e3, ".1f"), C.fmt(paired, ".3f") if k == "kept" else ""])
        label = C.STEP_MODELS[m][0]
        targets += [C.at_most(f"{m}_faults", f"{label}: faults per step kept <= {MAX_FAULTS}x default", faults,
                              MAX_FAULTS),
                    C.at_most(f"{m}_step", f"{label}: step kept <= {MAX_STEP}x default (paired)", paired, MAX_STEP)]
    s = shape(args.quick)
    print(f"\nCPU allocator, one process per model and setting, d {s['dim']} x {s['n_layers']} blocks, batch "
          f"{s['batch']} x seq {s['seq_len']}, {C.precision('cpu')}, {args.pairs} pairs x {args.steps} steps, "
          f"{info['cpu_model']}")
    print(C.format_table(["model", "allocator", "step ms", "faults/step", "sys ms/step", "kept/default"], rows))
    if not all(v["applied"] for v in summary.values()):
        print("note: the settings were not applied (not glibc, or HYPERBIT_MALLOC_TUNING=0 in the environment)")
    C.finish("cpu_allocator", info, targets, args.out, quick=args.quick, source_changed=False,
             settings=vars(args), results=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

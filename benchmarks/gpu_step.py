"""Training step time and peak memory of hyperbit's models on one CUDA GPU, against a plain GPT.

Claim: hyper-connections cost little on a GPU. Targets (ratios to hyperbit's Pre-Norm in the same
mode): DHC x4 <= 1.15x compiled and <= 1.30x eager, SHC x4 <= 1.10x compiled, DHC x4 peak memory
<= 1.15x (eager), mHC x4 <= 1.20x compiled, Pre-Norm + BitLinear <= 1.30x; and hyperbit's Pre-Norm
<= 1.0x the plain GPT (eager and compiled).

Models (``_common.STEP_MODELS``): a plain PyTorch GPT of the same shape written in the benchmark
(``_common.build_plain_gpt``: fused q/k/v, ``nn.RMSNorm``, SDPA, SwiGLU, untied head), hyperbit
Pre-Norm, SHC x4, DHC x4, mHC x4, Pre-Norm + BitLinear (frac x2 / x4 with ``--models``), each eager and with
regional compile (``hyperbit.models.compile_blocks``; the plain GPT's blocks compiled the same way).
bf16 autocast, fp32 parameters, ``torch.optim.AdamW(fused=True)``. Per size, every model is built
side by side, warmed up (compiled), then steps are timed round-robin (``_common.interleaved_timing``,
a ``cuda.synchronize`` around each step); reported: median of per-round medians, and the peak
memory of one step (``max_memory_allocated`` above what was allocated before it, gradients
included, plus the model's parameters and AdamW state).

Sizes: (d 1024, 12 blocks, seq 1024, batch 8) and (d 2048, 8 blocks, seq 2048, batch 4), vocab
32768, head dim 128. Meant to finish in about 5 minutes on one H200 (most of it compiling).
Without CUDA it prints one line and exits with status 2; ``--smoke`` runs the same logic on the CPU
at tiny sizes (what its test does).

    python benchmarks/gpu_step.py
    python benchmarks/gpu_step.py --models plain,prenorm,dhc4 --modes eager,compiled,compiled-plain
    python benchmarks/gpu_step.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

SIZES = [dict(vocab_size=32768, dim=1024, n_layers=12, n_heads=8, seq_len=1024, batch=8),
         dict(vocab_size=32768, dim=2048, n_layers=8, n_heads=16, seq_len=2048, batch=4)]
SMOKE_SIZES = [dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, seq_len=16, batch=2)]
MODES = ("eager", "compiled", "compiled-plain")
# (model, mode, threshold, measure, against)
TARGETS = [("dhc4", "compiled", 1.15, "step_s", "prenorm"), ("dhc4", "eager", 1.30, "step_s", "prenorm"),
           ("shc4", "compiled", 1.10, "step_s", "prenorm"), ("dhc4", "eager", 1.15, "peak_bytes", "prenorm"),
           ("mhc4", "compiled", 1.20, "step_s", "prenorm"), ("prenorm_bit", "eager", 1.30, "step_s", "prenorm"),
           ("prenorm_bit", "compiled", 1.30, "step_s", "prenorm"), ("prenorm", "eager", 1.0, "step_s", "plain"),
           ("prenorm", "compiled", 1.0, "step_s", "plain")]
DEFAULT_MODELS = "plain,prenorm,shc4,dhc4,mhc4,prenorm_bit"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, 1 round of 1 step; runs on the CPU when there is no CUDA")
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma list of {','.join(C.STEP_MODELS)} (default {DEFAULT_MODELS})")
    ap.add_argument("--modes", default="eager,compiled", help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 2)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_step.json)")
    args = ap.parse_args(argv)
    args.model_names = [m for m in args.models.split(",") if m]
    args.mode_names = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.model_names if m not in C.STEP_MODELS] + [m for m in args.mode_names if m not in MODES]
    if bad or not args.model_names or not args.mode_names:
        ap.error(f"unknown or no models / modes {bad}; models: {list(C.STEP_MODELS)}, modes: {list(MODES)}")
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.steps = args.steps or (1 if args.smoke else 5)
    args.warmup = (0 if args.smoke else 2) if args.warmup is None else args.warmup
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_step: no CUDA device (torch.cuda.is_available() is False); nothing measured "
              "(--smoke runs the logic on the CPU)")
        return 2
    device = "cuda" if cuda else "cpu"
    t_start = time.perf_counter()
    info = C.machine_info(device)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["cuda_memory_bytes"] = props.total_memory
    sizes = SMOKE_SIZES if args.smoke else SIZES
    memory_key = "peak_bytes" if cuda else "saved_bytes"
    per_size = []
    for shape in sizes:
        log(f"gpu_step: {shape}, {args.model_names} x {args.mode_names}, bf16 autocast, {device}")
        results = C.measure_steps(args.model_names, args.mode_names, shape, device, torch.bfloat16,
                                  args.rounds, args.steps, args.warmup, log=log,
                                  compile_kwargs={"backend": args.backend})
        per_size.append({"shape": shape, "results": results})
        if cuda:
            torch.cuda.empty_cache()
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - t_start, 1)

    targets = []
    for entry in per_size:
        s = entry["shape"]
        print(f"\nd {s['dim']} x {s['n_layers']} blocks, batch {s['batch']} x seq {s['seq_len']}, vocab "
              f"{s['vocab_size']}, bf16 autocast, AdamW{' fused' if cuda else ''}, {info.get('cuda_device', device)}; "
              f"{args.rounds} rounds x {args.steps} steps, interleaved" + ("  [SMOKE]" if args.smoke else ""))
        print(C.format_table(*C.step_table(entry["results"], memory_key)))
        for model, mode, threshold, what, base in TARGETS:
            t = C.step_target(entry["results"], model, mode, threshold,
                              what=memory_key if what != "step_s" else what, base=base)
            t["name"] += f"_d{s['dim']}"
            t["description"] += f" (d {s['dim']})"
            targets.append(t)
    print("step ms: median of per-round medians; x Pre-Norm: against Pre-Norm in the same mode (compiled-"
          f"plain against compiled); {memory_key}: " + ("one step's peak allocated (with gradients) plus "
          "parameters and AdamW state" if cuda else "bytes autograd saves in one forward (CPU smoke)"))
    out = Path(args.out) if args.out else C.RESULTS_DIR / ("gpu_step_smoke.json" if args.smoke else "gpu_step.json")
    C.finish("gpu_step", info, targets, out, quick=args.smoke, source_changed=False,
             settings={"device": device, "smoke": args.smoke, "models": args.model_names,
                       "modes": args.mode_names, "rounds": args.rounds, "steps": args.steps,
                       "warmup": args.warmup, "backend": args.backend, "dtype": "bf16 autocast"},
             sizes=per_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

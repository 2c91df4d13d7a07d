"""How fast and how small a packed ternary linear (``PackedBitLinear``) is against a plain linear.

Claims: at M = 1 (one token, decoding) the packed layer's forward is at least 3x faster than an
fp32 ``F.linear`` of the same shape, and its weight takes exactly 1/16 of the fp32 weight's bytes.

Method: for each (M, K, N) a ``BitLinear(K, N)`` with a random weight is packed with
``PackedBitLinear.from_bitlinear``; an input ``(M, K)`` goes through ``F.linear`` with the fp32
weight, the same under bf16 autocast (only where the CPU computes bf16 natively,
``hyperbit.train.precision.native_bf16``), and the packed layer (per-token int8 activation
quantisation + the int8 product + fp32 rescale, all timed): its default kernel (oneDNN's prepacked
the int8 codes and ``torch._int_mm``) and, as a second column, the opt-in oneDNN prepacked s8 x s8
kernel (``use_onednn``, where ``hyperbit.nn.packed.onednn_available()``; else the default again). Timed round-robin in one process
(``_common.interleaved_timing``), inference mode; medians of all timed calls.

    python benchmarks/ternary_linear.py [--rounds 5] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, finish, fmt, format_table, interleaved_timing, machine_info,  # noqa: E402
                     median, setup_paths, source_digest, warmup)

setup_paths()

SHAPES = ((1, 4096, 4096), (64, 4096, 4096), (1, 2048, 2048))
TARGET_SPEEDUP = 3.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed calls of each configuration per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "ternary_linear.json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from hyperbit.nn import BitLinear, PackedBitLinear
    from hyperbit.nn.packed import onednn_available
    from hyperbit.train.precision import native_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    digest = source_digest()
    bf16 = native_bf16("cpu")
    fns, meta = {}, {}
    torch.manual_seed(0)
    for m, k, n in SHAPES:
        key = f"{m}x{k}x{n}"
        layer = BitLinear(k, n)
        packed = PackedBitLinear.from_bitlinear(layer)
        onednn = PackedBitLinear.from_bitlinear(layer)
        onednn.use_onednn = onednn_available()
        w = layer.weight.detach()
        x = torch.randn(m, k)
        sd = packed.state_dict()
        meta[key] = {"fp32_weight_bytes": w.numel() * w.element_size(),
                     "packed_weight_bytes": sd["packed"].numel() * sd["packed"].element_size(),
                     "state_dict_bytes": sum(t.numel() * t.element_size() for t in sd.values())}

        def fp32(x=x, w=w) -> None:
            F.linear(x, w)

        def bf16_autocast(x=x, w=w) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                F.linear(x, w)

        def run_packed(x=x, packed=packed) -> None:
            packed(x)

        def run_onednn(x=x, packed=onednn) -> None:
            packed(x)

        fns[f"{key} fp32"] = fp32
        if bf16:
            fns[f"{key} bf16"] = bf16_autocast
        fns[f"{key} packed"] = run_packed
        fns[f"{key} oneDNN"] = run_onednn
    with torch.inference_mode():
        warmup(fns, args.warmup)
        times = interleaved_timing(fns, args.rounds, args.steps)
    med = {name: median([s for r in ts for s in r]) for name, ts in times.items()}

    rows, targets = [], []
    for m, k, n in SHAPES:
        key = f"{m}x{k}x{n}"
        t32, tb, tp = med[f"{key} fp32"], med.get(f"{key} bf16"), med[f"{key} packed"]
        ti = med[f"{key} oneDNN"]
        mb = meta[key]
        meta[key].update(fp32_s=t32, bf16_s=tb, packed_s=tp, onednn_s=ti, speedup_vs_fp32=t32 / tp,
                         onednn_speedup_vs_fp32=t32 / ti,
                         speedup_vs_bf16=(tb / tp) if tb else None)
        rows.append([f"({m}, {k}, {n})", fmt(t32 * 1e3, ".3f", " ms"), fmt(tb * 1e3 if tb else None, ".3f", " ms"),
                     fmt(tp * 1e3, ".3f", " ms"), fmt(ti * 1e3, ".3f", " ms"), fmt(t32 / tp, ".2f", "x"),
                     fmt(tb / tp if tb else None, ".2f", "x"), fmt(t32 / ti, ".2f", "x"),
                     f"{mb['fp32_weight_bytes']:,}", f"{mb['packed_weight_bytes']:,}",
                     fmt(mb["fp32_weight_bytes"] / mb["packed_weight_bytes"], ".1f", "x")])
        if m == 1:
            targets.append({"description": f"M=1 {key}: packed >= {TARGET_SPEEDUP}x faster than fp32 F.linear",
                            "ratio": t32 / tp, "target": TARGET_SPEEDUP, "passed": t32 / tp >= TARGET_SPEEDUP})
    exact = all(v["packed_weight_bytes"] * 16 == v["fp32_weight_bytes"] for v in meta.values())
    targets.append({"description": "packed weight bytes exactly 1/16 of fp32 (fp32 / packed)",
                    "ratio": min(v["fp32_weight_bytes"] / v["packed_weight_bytes"] for v in meta.values()),
                    "target": 16.0, "passed": exact})
    print(f"ternary linear forward, CPU, {torch.get_num_threads()} threads, native bf16: {bf16}, "
          f"{args.rounds} rounds x {args.steps} calls, medians; packed kernel: "
          f"torch._int_mm; second column: {'oneDNN prepacked' if onednn_available() else 'the same'}")
    print(format_table(["(M, K, N)", "fp32", "bf16 autocast", "packed", "oneDNN", "vs fp32", "vs bf16", "oneDNN vs fp32",
                        "fp32 weight B", "packed B", "smaller"], rows))
    finish("ternary_linear", info, targets, args.out, quick=args.rounds < 3,
           source_changed=source_digest() != digest, native_bf16=bf16, onednn=onednn_available(), shapes=meta, median_s=med, times=times)


if __name__ == "__main__":
    main()

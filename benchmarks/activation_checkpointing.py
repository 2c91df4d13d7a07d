"""Per-block activation checkpointing: saved activation bytes and step time, with and without.

Claim: ``hyperbit.models.set_activation_checkpointing`` cuts the activations kept for backward to
about one block input per block (plus the embedding / head side), for the price of one more
forward per block in backward. Measured on the CPU (``_common.saved_activation_bytes``: bytes of
tensors autograd saves in one forward, deduplicated by storage; deterministic) and, for the cost,
eager step times timed round-robin (``_common.interleaved_timing``), in the precision
``train.precision=auto`` picks.

    python benchmarks/activation_checkpointing.py            # d 256 x 6 blocks, batch 8 x seq 256
    python benchmarks/activation_checkpointing.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

from hyperbit.models import set_activation_checkpointing  # noqa: E402

SHAPE = dict(vocab_size=256, dim=256, n_layers=6, n_heads=4, seq_len=256, batch=8)
SHAPE_QUICK = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, seq_len=16, batch=2)
MODELS = ("prenorm", "dhc4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="d 32 x 2 blocks, batch 2 x seq 16, 1 round")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = SHAPE_QUICK if args.quick else SHAPE
    rounds = args.rounds or (1 if args.quick else 3)
    info = C.machine_info("cpu")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g)
    targets = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g)
    results, fns = {}, {}
    for name in MODELS:
        for ckpt in (False, True):
            key = f"{name}/{'checkpointed' if ckpt else 'plain'}"
            model = set_activation_checkpointing(C.build_step_model(name, shape, "cpu", False), ckpt)
            with C.autocast("cpu"):
                saved = C.saved_activation_bytes(model, lambda: model(idx, targets)[1], exclude=[idx, targets])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            fns[key] = C.make_train_step(model, opt, idx, targets, "cpu")
            results[key] = {"saved_bytes": saved["bytes"], "label": C.STEP_MODELS[name][0]}
    C.warmup(fns, 1)
    for key, per_round in C.interleaved_timing(fns, rounds, 2).items():
        results[key]["step_s"] = C.median(C.median(r) for r in per_round)
    rows, checks = [], []
    for key, r in results.items():
        base = results[key.split("/")[0] + "/plain"]
        r["saved_ratio"] = C.ratio(r["saved_bytes"], base["saved_bytes"])
        r["step_ratio"] = C.ratio(r["step_s"], base["step_s"])
        rows.append([r["label"], key.split("/")[1], C.fmt(r["saved_bytes"] / C.MIB, ".1f"),
                     C.fmt(r["saved_ratio"], ".3f"), C.fmt(r["step_s"] * 1e3), C.fmt(r["step_ratio"], ".3f")])
        if key.endswith("checkpointed"):
            checks.append({"name": f"{key}_saved", "description": f"{r['label']}: checkpointed saved "
                           "activations <= 0.5x plain", "ratio": r["saved_ratio"], "threshold": 0.5,
                           "passed": None if r["saved_ratio"] is None else bool(r["saved_ratio"] <= 0.5)})
    print(f"\nactivation checkpointing: d {shape['dim']} x {shape['n_layers']} blocks, batch {shape['batch']} x "
          f"seq {shape['seq_len']}, {C.precision('cpu')}, {torch.get_num_threads()} threads, eager; "
          f"{rounds} rounds x 2 steps" + ("  [QUICK]" if args.quick else ""))
    print(C.format_table(["model", "blocks", "saved MiB", "x plain", "step ms", "x plain"], rows))
    default = C.RESULTS_DIR / ("activation_checkpointing_quick.json" if args.quick else "activation_checkpointing.json")
    C.finish("activation_checkpointing", info, checks, Path(args.out) if args.out else default, quick=args.quick,
             source_changed=False, settings={"shape": shape, "rounds": rounds}, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

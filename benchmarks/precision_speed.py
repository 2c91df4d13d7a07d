"""Which precision trains fastest on this machine, and whether ``train.precision=auto`` picks it.

Claim: ``auto`` (bf16 autocast where the device computes bf16 natively, fp32 elsewhere) trains at
least 0.95x as fast as the faster of fp32 and bf16 on this machine. On CPUs without avx512_bf16 /
amx_bf16 an emulated bf16 matrix product is several times slower than fp32, which is why bf16 is
not the default there.

Method: the ``demo`` run preset's model (DHC x4, d 128, 4 blocks) and batch (16 x 128 tokens), one
full training step (forward, backward, AdamW step, as ``hyperbit train`` runs it) under each
precision, timed round-robin in one process (``_common.interleaved_timing``: the starting
precision rotates every round); the median step gives tokens/s. The demo's wall time is estimated
as its 1,500 steps over that rate (evaluation and data preparation not counted).

    python benchmarks/precision_speed.py [--rounds 5] [--steps 4] [--preset demo] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, finish, fmt, format_table, interleaved_timing, machine_info,  # noqa: E402
                     median, setup_paths, source_digest, warmup)

setup_paths()

TARGET = 0.95
PRECISIONS = ("fp32", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", help="run preset whose model and batch are timed")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="overrides of the preset, e.g. model.dim=512 (a larger model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each precision per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "precision_speed.json")
    args = ap.parse_args()

    import torch

    from hyperbit.models import build_model
    from hyperbit.train import param_groups, resolve_run_config
    from hyperbit.train.precision import autocast, native_bf16, resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    digest = source_digest()
    cfg = resolve_run_config(args.preset, ["train.device=cpu", *args.overrides])
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len), generator=g)
    fns = {}
    for p in PRECISIONS:
        torch.manual_seed(t.seed)
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))

        def step(model=model, opt=opt, p=p) -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(p, "cpu"):
                _, loss = model(idx, idx)
            loss.backward()
            opt.step()

        fns[p] = step
    warmup(fns, args.warmup)
    times = interleaved_timing(fns, args.rounds, args.steps)
    tokens = t.batch_size * t.seq_len
    step_s = {p: median([s for r in times[p] for s in r]) for p in PRECISIONS}
    tok_s = {p: tokens / step_s[p] for p in PRECISIONS}
    auto = resolve_precision("auto", "cpu")
    best = max(PRECISIONS, key=lambda p: tok_s[p])
    demo_min = {p: t.steps * tokens / tok_s[p] / 60 for p in PRECISIONS}
    rows = [[p, fmt(step_s[p] * 1e3, ".1f", " ms"), fmt(tok_s[p], ",.0f"), fmt(tok_s[p] / tok_s["fp32"], ".2f", "x"),
             fmt(demo_min[p], ".1f", " min"), "<- auto" if p == auto else ""] for p in PRECISIONS]
    print(f"{args.preset} preset training step ({cfg.model.pathway} x{cfg.model.expansion_rate}, d {cfg.model.dim}, "
          f"{cfg.model.n_layers} blocks, batch {t.batch_size} x {t.seq_len}), {torch.get_num_threads()} threads, "
          f"native bf16: {native_bf16('cpu')}")
    print(format_table(["precision", "step (median)", "tokens/s", "vs fp32", f"{t.steps} steps", ""], rows))
    targets = [{"description": f"auto ({auto}) tokens/s >= {TARGET}x the faster precision ({best})",
                "ratio": tok_s[auto] / tok_s[best], "target": TARGET,
                "passed": tok_s[auto] >= TARGET * tok_s[best]}]
    finish("precision_speed", info, targets, args.out, quick=args.rounds < 3,
           source_changed=source_digest() != digest, preset=args.preset, native_bf16=native_bf16("cpu"),
           overrides=args.overrides, auto=auto, step_s=step_s, tokens_per_s=tok_s, demo_minutes=demo_min, times=times)


if __name__ == "__main__":
    main()

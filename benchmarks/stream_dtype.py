"""Drift of keeping the residual streams in bf16 instead of fp32 under bf16 autocast, over a deep stack.

Claim checked: hyperbit keeps the streams of an fp32 model in fp32 under autocast (the dtype
contract of ``hyperbit.pathways.hyper``); bf16 streams would halve the bytes of the ``(B, T, n, d)``
state, at the price of one bf16 rounding of the whole state per branch. This measures that price.

For Pre-Norm and DHC x4 (connections moved off their init so they mix), one fp32 model, three runs
on the same batch:

    fp32       no autocast (the reference)
    ac+fp32    bf16 autocast, fp32 streams (the default)
    ac+bf16    bf16 autocast, the embedding output cast to bf16, so every stream is bf16

Reported per run: relative L2 error of the logits and of the flattened gradient of all
parameters against the reference, and the loss difference.

    python benchmarks/stream_dtype.py                 # d 256, 32 blocks, batch 4 x seq 128
    python benchmarks/stream_dtype.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

from hyperbit import ModelConfig  # noqa: E402
from hyperbit.models import build_model  # noqa: E402

MODELS = {"prenorm": ("Pre-Norm", {}), "dhc4": ("DHC x4", dict(pathway="hc", expansion_rate=4))}
THRESHOLD = 0.01  # relative gradient error of bf16 streams that would count as "accurate enough"


def run(model, idx, targets, autocast: bool, bf16_streams: bool):
    model.zero_grad(set_to_none=True)
    hook = None
    if bf16_streams:
        hook = model.embed.register_forward_hook(lambda m, i, out: out.to(torch.bfloat16))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, targets)
        loss.backward()
    finally:
        if hook is not None:
            hook.remove()
    grad = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return logits.detach().float(), loss.detach().item(), grad


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="d 64, 8 blocks, batch 2 x seq 32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    d, layers, B, T = (64, 8, 2, 32) if args.quick else (256, 32, 4, 128)
    info = C.machine_info("cpu")
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)
    rows, results = [], {}
    for key, (label, kw) in MODELS.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(dim=d, n_layers=layers, n_heads=4, max_seq_len=T, **kw))
        with torch.no_grad():  # connections off their Pre-Norm-equivalent init, so they mix
            for name, p in model.named_parameters():
                if "static_" in name or "dynamic_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        ref = run(model, idx, targets, autocast=False, bf16_streams=False)
        results[key] = {}
        for run_name, bf16 in (("ac+fp32", False), ("ac+bf16", True)):
            logits, loss, grad = run(model, idx, targets, autocast=True, bf16_streams=bf16)
            r = {"logits_rel_err": rel(logits, ref[0]), "loss_diff": loss - ref[1], "grad_rel_err": rel(grad, ref[2])}
            results[key][run_name] = r
            rows.append([label, run_name, C.fmt(r["logits_rel_err"], ".2e"), C.fmt(r["loss_diff"], "+.2e"),
                         C.fmt(r["grad_rel_err"], ".2e")])
    print(f"\nstream dtype drift: d {d}, {layers} blocks, batch {B} x seq {T}, fp32 parameters, "
          "errors against no autocast" + ("  [QUICK]" if args.quick else ""))
    print(C.format_table(["model", "run", "logits rel err", "loss diff", "grad rel err"], rows))
    targets = []
    for key, (label, _) in MODELS.items():
        ratio = C.ratio(results[key]["ac+bf16"]["grad_rel_err"], results[key]["ac+fp32"]["grad_rel_err"])
        targets.append({"name": f"{key}_bf16_streams", "description": f"{label}: bf16 streams grad error / "
                        "fp32 streams grad error (information)", "ratio": ratio, "threshold": None,
                        "passed": None})
    default = C.RESULTS_DIR / ("stream_dtype_quick.json" if args.quick else "stream_dtype.json")
    C.finish("stream_dtype", info, targets, Path(args.out) if args.out else default, quick=args.quick,
             source_changed=False, settings={"dim": d, "n_layers": layers, "batch": B, "seq": T},
             results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of mHC's Sinkhorn-Knopp map against the textbook log-domain iteration.

Claim checked: ``hyperbit.pathways.sinkhorn.sinkhorn`` (a row-max-shifted matrix scaling with the
log-domain iterates, then the rounding step; on CPU one C kernel call forward and one backward)
takes at most 0.75x the time of the log-domain form in a recomputing node, forward and backward, at
the sizes an mHC layer sees (one 4 x 4 matrix per token, 20 rounds).

All are timed forward + backward on the same ``(N, n, n)`` fp32 logits, interleaved rounds, medians:

    log-domain            written here: ``z -= logsumexp(z, rows); z -= logsumexp(z, columns)``
                          per round, tokens last, then the same rounding step; plain autograd
    scaling               hyperbit's iteration (``_sinkhorn_reference``), plain autograd
    log-domain recompute  the log-domain form in a node that keeps only the logits and redoes
                          the iterations in backward (hyperbit's earlier implementation)
    scaling recompute     the scaling form in that recomputing node (``_Sinkhorn``: hyperbit's
                          path on CUDA and where no C compiler is found)
    hyperbit              ``sinkhorn(logits, iters)``: on CPU the C kernel (``nn/native.c``), one
                          call forward and one backward, keeping only the logits

The target compares like with like: the two recomputing nodes.

The script also checks that both give the same matrices (max abs difference, printed).

    python benchmarks/sinkhorn.py                 # N 2048 tokens, n 4, 20 rounds
    python benchmarks/sinkhorn.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

from hyperbit.pathways.sinkhorn import _Sinkhorn, _sinkhorn_reference, round_doubly_stochastic, sinkhorn  # noqa: E402

TARGET = 0.75  # hyperbit's time / the recomputing log-domain node's


def log_domain(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The log-domain iteration with max-shifted logsumexps, tokens last, then the rounding step."""
    n = logits.shape[-1]
    z = logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()
    for _ in range(iters):
        for dim in (1, 0):
            top = z.detach().amax(dim, keepdim=True)
            z = z - ((z - top).exp().sum(dim, keepdim=True).log() + top)
    return round_doubly_stochastic(z.exp(), dims=(0, 1)).permute(2, 0, 1)


class _Recompute(torch.autograd.Function):
    """Keep the logits only; redo ``fn`` under autograd in backward."""

    @staticmethod
    def forward(ctx, logits, iters, fn):
        ctx.save_for_backward(logits)
        ctx.iters, ctx.fn = iters, fn
        return fn(logits, iters)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.fn(z, ctx.iters), z, grad)
        return g, None, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke test")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds, args.steps = 64, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    info = C.machine_info("cpu")
    g = torch.Generator().manual_seed(0)
    n = args.streams
    logits = (3 * torch.randn(args.tokens, n, n, generator=g)).requires_grad_(True)
    probe = torch.randn(args.tokens, n, n, generator=g)
    fns = {"log-domain": lambda: (log_domain(logits, args.iters) * probe).sum().backward(),
           "scaling": lambda: (_sinkhorn_reference(logits, args.iters) * probe).sum().backward(),
           "log-domain recompute": lambda: (_Recompute.apply(logits, args.iters, log_domain) * probe
                                            ).sum().backward(),
           "scaling recompute": lambda: (_Sinkhorn.apply(logits, args.iters, False) * probe).sum().backward(),
           "hyperbit": lambda: (sinkhorn(logits, args.iters) * probe).sum().backward()}
    with torch.no_grad():
        diff = float((log_domain(logits, args.iters) - sinkhorn(logits, args.iters)).abs().max())
    C.warmup(fns, 2)
    times = C.interleaved_timing(fns, args.rounds, args.steps)
    med = {k: C.median(s for r in v for s in r) for k, v in times.items()}
    ratio = C.ratio(med["hyperbit"], med["log-domain recompute"])
    print(f"\nSinkhorn forward + backward: {args.tokens} tokens x ({n} x {n}), {args.iters} rounds, fp32, "
          f"{torch.get_num_threads()} threads, {info['cpu_model']}")
    print(C.format_table(["implementation", "ms", "x log-domain"],
                         [[k, C.fmt(1e3 * v), C.fmt(C.ratio(v, med['log-domain']), '.3f')] for k, v in med.items()]))
    print(f"max |difference| of the matrices: {diff:.2e}")
    targets = [{"description": f"hyperbit sinkhorn <= {TARGET}x the recomputing log-domain node (forward + backward)",
                "ratio": ratio, "threshold": TARGET, "passed": ratio is not None and ratio <= TARGET}]
    out = args.out or C.RESULTS_DIR / ("sinkhorn_quick.json" if args.quick else "sinkhorn.json")
    C.finish("sinkhorn", info, targets, out, quick=args.quick, source_changed=False,
             settings=vars(args), median_s=med, max_abs_difference=diff)


if __name__ == "__main__":
    main()

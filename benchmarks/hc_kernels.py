"""Time spent in the hyper-connection CPU kernels inside training steps, for two variants side by side.

Claim checked: the depth connection's backward run inside the next width connection's backward
kernel (``pathways.hyper.FUSE_DEPTH_BACKWARD``, the default) costs less kernel time per step than
its own kernel. Whole steps on a shared 2-core machine vary by 10-20% from round to round, so a
change of a few milliseconds per step cannot be read from step times; the kernels' own time can.

Every call of the kernels of ``nn/native.c`` (the width forward and backward, the depth node's
mixing and backward, the Sinkhorn) is timed inside eager training steps of one model (bf16
autocast where the CPU has it, as ``hyperbit train``), per kernel, for two variants in one
process, the order alternating by round:

    base           the package's defaults
    unfused-depth  FUSE_DEPTH_BACKWARD off: each depth node runs its own backward kernel
    no-rebuild     REBUILD_STREAMS off: every width node keeps its own copy of the streams
    pytorch-mhc    mHC's projection, per-token map and width backward in PyTorch ops around the
                   mixing kernels HC shares (``_mhc_fused.MHC_KERNELS`` off); their time is not
                   kernel time: compare the steps
    source=PATH    the kernels built from another ``native.c`` with the same entry points
                   (e.g. one from ``git show REV:src/hyperbit/nn/native.c``; the files it
                   includes are read next to it, else from the package)

    python benchmarks/hc_kernels.py                               # unfused-depth against base, DHC x4
    python benchmarks/hc_kernels.py --variants source=/tmp/native_before.c,base
    python benchmarks/hc_kernels.py --model mhc4 --variants pytorch-mhc,base --compiled
    python benchmarks/hc_kernels.py --quick                       # d 32 x 2 blocks, 1 round
    python benchmarks/hc_kernels.py --isolated --threads 1        # each kernel alone, same buffers

``--isolated`` times each kernel alone instead, called again and again on the same buffers (DHC x4
shapes: 2,048 tokens x n 4 x d 256, or --quick's), median of --calls calls. ``--compiled`` times
the steps of the model with its blocks compiled (``compile_blocks``, Inductor), where the kernels
run as ``torch.library`` operators; each variant is a graph of its own (a recompile on its switch).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from hyperbit.nn import native, native_mhc  # noqa: E402
from hyperbit.pathways import _mhc_fused, hyper  # noqa: E402

KERNELS = ("hc_forward", "hc_forward_dynamic", "hc_rebuild", "hc_branch_input", "hc_backward",
           "hc_alpha_backward", "mhc_forward", "mhc_backward", "mhc_backward_fused", "mhc_project",
           "depth_forward", "depth_backward", "sinkhorn", "sinkhorn_backward")
SHAPE = dict(vocab_size=256, dim=256, n_layers=6, n_heads=4, seq_len=256, batch=8)
SHAPE_QUICK = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, seq_len=16, batch=2)


class KernelClock:
    """Wraps the kernels of :mod:`hyperbit.nn.native` and :mod:`hyperbit.nn.native_mhc` with a
    timer: seconds and calls per kernel since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        for name in KERNELS:
            module = native_mhc if hasattr(native_mhc, name) else native
            setattr(module, name, self._timed(name, getattr(module, name)))

    def _timed(self, name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return run

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _variant(spec: str):
    """A context manager that switches the package to variant ``spec`` while it is entered."""
    if spec == "base":
        return lambda: _patched(hyper, {})
    if spec == "unfused-depth":
        return lambda: _patched(hyper, {"FUSE_DEPTH_BACKWARD": False})
    if spec == "no-rebuild":
        return lambda: _patched(hyper, {"REBUILD_STREAMS": False})
    if spec == "pytorch-mhc":
        return lambda: _patched(_mhc_fused, {"MHC_KERNELS": False})
    if spec.startswith("source="):
        path = Path(spec.split("=", 1)[1])
        if not path.is_file():
            raise SystemExit(f"hc_kernels: no such file: {path}")
        lib = _library(path)
        return lambda: _patched(native._state, {"lib": lib})
    raise SystemExit(f"hc_kernels: unknown variant {spec!r} (base, unfused-depth, no-rebuild, "
                     "pytorch-mhc, source=PATH)")


def _library(path: Path):
    """The kernels built from ``path`` (the package's build cache and loader)."""
    source, state = native.SOURCE, dict(native._state)
    native.SOURCE = path
    native._state.clear()
    try:
        lib = native.library()
    finally:
        native.SOURCE = source
        native._state.clear()
        native._state.update(state)
    if lib is None:
        raise SystemExit(f"hc_kernels: the kernels of {path} could not be built")
    return lib


@contextmanager
def _patched(target, values: dict):
    get = (lambda k: target[k]) if isinstance(target, dict) else (lambda k: getattr(target, k))
    put = target.__setitem__ if isinstance(target, dict) else (lambda k, v: setattr(target, k, v))
    old = {k: get(k) for k in values}
    for k, v in values.items():
        put(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            put(k, v)


def isolated(args, info) -> int:
    """Each kernel alone on the same buffers (the caches warm): median ms of ``args.calls`` calls."""
    n, d, tokens = 4, (32 if args.quick else 256), (64 if args.quick else 2048)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g)  # noqa: E731
    h, lead = r(tokens, n, d), (tokens,)
    alpha, beta, wt = r(*lead, n, n + 1, s=0.2), r(*lead, n), r(n + 2, d, s=0.1)
    static_alpha, static_beta, norm_w = r(n, n + 1, s=0.2), r(n), 1 + 0.1 * r(d)
    (x, _, saved, rstd), (a, b, rr, p, t) = native.hc_forward_dynamic(
        h, static_alpha, static_beta, wt, 0.01, 0.01, 1e-6, True, True, norm_w, 1e-6, mixed=False)
    gx, gm, gb = r(*lead, d), r(*lead, n, d), r(*lead, n)
    y = r(*lead, d).bfloat16()
    calls = {
        "width forward (DHC)": lambda: native.hc_forward_dynamic(
            h, static_alpha, static_beta, wt, 0.01, 0.01, 1e-6, True, True, norm_w, 1e-6, mixed=False),
        "width backward, bf16 copy": lambda: native.hc_backward(
            saved, a, gx, gm, gb, t, rr, p, wt, 0.01, 0.01, True, norm=(rstd, norm_w, True)),
        "width backward, rebuilt": lambda: native.hc_backward(
            None, a, gx, gm, gb, t, rr, p, wt, 0.01, 0.01, True, source=(saved, alpha, beta, y),
            round_bf16=True, norm=(rstd, norm_w, True)),
        "rebuild (depth forward)": lambda: native.hc_rebuild(h, alpha, beta, y, torch.float32),
        "depth backward": lambda: native.depth_backward(gm, beta, y, True, True),
    }
    ms = {}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms[name] = 1e3 * C.median(times)
    print(f"\nHC kernels alone: {tokens} tokens x n {n} x d {d}, fp32 (bf16 copy / branch output), "
          f"{torch.get_num_threads()} threads, {info['cpu_model']}; median of {args.calls} calls"
          + ("  [QUICK]" if args.quick else ""))
    print(C.format_table(["kernel", "ms"], [[k, C.fmt(v, ".3f")] for k, v in ms.items()]))
    out = args.out or C.RESULTS_DIR / ("hc_kernels_isolated_quick.json" if args.quick else "hc_kernels_isolated.json")
    C.finish("hc_kernels_isolated", info, [], out, quick=args.quick, source_changed=False,
             settings={"tokens": tokens, "n": n, "d": d, "calls": args.calls,
                       "threads": torch.get_num_threads()}, median_ms=ms)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dhc4", help="a model of --models-list of train_throughput.py (default dhc4)")
    ap.add_argument("--variants", default="unfused-depth,base", help="A,B (default unfused-depth,base)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 10; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="d 32 x 2 blocks, batch 2 x seq 16, 1 round")
    ap.add_argument("--isolated", action="store_true", help="time each kernel alone (see above)")
    ap.add_argument("--compiled", action="store_true", help="the model's blocks compiled (see above)")
    ap.add_argument("--calls", type=int, default=100, help="--isolated: calls per kernel (default 100)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if native.library() is None:
        raise SystemExit("hc_kernels: the CPU kernels are not available here (no C compiler, or HYPERBIT_NATIVE=0)")
    if args.model not in C.STEP_MODELS or args.model == "plain":
        raise SystemExit(f"hc_kernels: --model must be one of {[m for m in C.STEP_MODELS if m != 'plain']}")
    names = [v for v in args.variants.split(",") if v]
    if len(names) != 2 or names[0] == names[1]:
        raise SystemExit("hc_kernels: --variants takes two different variants, A,B")
    variants = {name: _variant(name) for name in names}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isolated:
        return isolated(args, C.machine_info("cpu"))
    rounds = args.rounds or (1 if args.quick else 10)
    shape = SHAPE_QUICK if args.quick else SHAPE
    info = C.machine_info("cpu")
    C.allocator_as_train(info)
    clock = KernelClock()
    if args.compiled:  # a graph per variant: above dynamo's default limit of recompiles
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model = C.build_step_model(args.model, shape, "cpu", compiled=args.compiled, fused_hc=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    idx, tgt = (torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g)
                for _ in range(2))
    step = C.make_train_step(model, opt, idx, tgt, "cpu")
    for name in names:  # warm-up: the build, the allocator, the caches
        with variants[name]():
            step()
    per_round = {name: {"step_s": [], "kernel_s": defaultdict(list), "calls": {}} for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            with variants[name]():
                steps, kernels = [], defaultdict(float)
                for _ in range(args.steps):
                    clock.reset()
                    t0 = time.perf_counter()
                    step()
                    steps.append(time.perf_counter() - t0)
                    for k, s in clock.seconds.items():
                        kernels[k] += s / args.steps
                rec = per_round[name]
                rec["step_s"].append(C.median(steps))
                for k in KERNELS:
                    rec["kernel_s"][k].append(kernels.get(k, 0.0))
                rec["calls"] = {k: c for k, c in clock.calls.items()}  # per step (the last one)
    a, b = names
    used = [k for k in KERNELS if any(per_round[n]["kernel_s"][k][i] for n in names for i in range(rounds))]
    med = {n: {k: C.median(per_round[n]["kernel_s"][k]) for k in used} for n in names}
    for n in names:
        med[n]["all kernels"] = C.median([sum(per_round[n]["kernel_s"][k][i] for k in used) for i in range(rounds)])
        med[n]["step"] = C.median(per_round[n]["step_s"])
    paired = sorted(y / x for x, y in zip(per_round[a]["step_s"], per_round[b]["step_s"]))
    calls = lambda n, k: str(per_round[n]["calls"].get(k, 0)) if k in used else "-"  # noqa: E731
    rows = [[k, calls(a, k), calls(b, k), C.fmt(1e3 * med[a][k]), C.fmt(1e3 * med[b][k]),
             C.fmt(1e3 * (med[b][k] - med[a][k]), "+.2f")] for k in [*used, "all kernels", "step"]]
    mode = "compiled" if args.compiled else "eager"
    print(f"\n{C.STEP_MODELS[args.model][0]} {mode}, d {shape['dim']} x {shape['n_layers']} blocks, batch "
          f"{shape['batch']} x seq {shape['seq_len']}, {C.precision('cpu')}, {torch.get_num_threads()} threads, "
          f"{info['cpu_model']}; {rounds} rounds x {args.steps} steps, A = {a}, B = {b}"
          + ("  [QUICK]" if args.quick else ""))
    print(C.format_table(["kernel", "calls A", "calls B", "A ms/step", "B ms/step", "B - A ms"], rows))
    print(f"step B / A, paired by round: median {C.fmt(C.median(paired), '.3f')} "
          f"(IQR {C.fmt(C._quantile(paired, 0.25), '.3f')}-{C.fmt(C._quantile(paired, 0.75), '.3f')})")
    if "pytorch-mhc" in names:  # part of one variant's work is not kernel time: compare the steps
        target = {"description": f"step, B ({b}) <= A ({a}), paired by round", "ratio": C.median(paired),
                  "threshold": 1.0}
    else:
        target = {"description": f"kernel time per step, B ({b}) <= A ({a})",
                  "ratio": C.ratio(med[b]["all kernels"], med[a]["all kernels"]), "threshold": 1.0}
    target["passed"] = target["ratio"] is not None and target["ratio"] <= 1.0
    out = args.out or C.RESULTS_DIR / ("hc_kernels_quick.json" if args.quick else "hc_kernels.json")
    C.finish("hc_kernels", info, [target], out, quick=args.quick, source_changed=False,
             settings={"model": args.model, "variants": names, "rounds": rounds, "steps": args.steps,
                       "compiled": args.compiled, "shape": shape, "threads": torch.get_num_threads()},
             median_s=med, calls_per_step={n: per_round[n]["calls"] for n in names},
             per_round={n: {"step_s": per_round[n]["step_s"], "kernel_s": dict(per_round[n]["kernel_s"])}
                        for n in names},
             step_ratio_paired=paired)
    return 0


if __name__ == "__main__":
    sys.exit(main())

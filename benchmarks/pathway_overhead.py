"""Cost of the residual pathway and of BitLinear: step time, peak memory, saved activations.

Configurations (``--configs`` picks a subset; ``prenorm`` is always added as the baseline):

    prenorm                 Pre-Norm, fp linears (the baseline every ratio refers to)
    shc1 shc2 shc4 shc8     static hyper-connections, expansion rate n
    dhc1 dhc2 dhc4 dhc8     dynamic hyper-connections, expansion rate n
    prenorm_bitnet          Pre-Norm with BitLinear b1.58 (vs prenorm: BitLinear vs fp)
    dhc4_bitnet             DHC x4 with BitLinear

Model: ``hyperbit.preset("small")`` (d 256, 6 blocks, vocab 256), seq 256, batch 8, the precision
``hyperbit train`` picks (bf16 autocast where native, else fp32),
2 torch threads, ``hyperbit.make_optimizer(model, lr=1e-3)`` (AdamW).

Method
    * Step time (forward + backward + AdamW step): every model is built once in this process and
      warmed up (``--warmup`` steps); then ``--rounds`` rounds each run every configuration for
      ``--steps`` steps, round-robin, the starting configuration rotating every round. Each step is
      timed alone; the table shows the median over all rounds and steps and its ratio to the
      prenorm median of the same run.
    * Peak memory: one fresh subprocess per configuration (this script with the hidden flag
      ``--measure-memory NAME``). CPU: peak RSS over 3 training steps minus the RSS right after
      importing torch and building the input batch, i.e. parameters + grads + AdamW state +
      activations + allocator overhead + the runtime's lazy initialisation. The peak is VmHWM,
      not ``ru_maxrss`` (which in a subprocess includes the parent's peak RSS). "peak-init" is
      the same peak minus the RSS after one tiny same-kind warm-up step, i.e. mostly without the
      runtime's constant start-up cost. CUDA: ``torch.cuda.max_memory_allocated`` over the steps
      minus the allocation before the model was built.
    * Saved activations: exact bytes of tensors autograd saves for backward during one forward
      (``saved_tensors_hooks``; deduplicated by storage; parameters, buffers and the input batch
      excluded). Deterministic: a cross-check of the RSS numbers.

Targets (reported as pass/fail, never an error exit): DHC x4 step <= 1.10x prenorm, DHC x4 peak
memory <= 1.30x prenorm, prenorm + BitLinear step <= 1.35x prenorm (fp).

    python benchmarks/pathway_overhead.py                      # full run (many minutes on CPU)
    python benchmarks/pathway_overhead.py --quick              # tiny model, smoke test
    python benchmarks/pathway_overhead.py --configs dhc4,prenorm_bitnet --rounds 11
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

import hyperbit  # noqa: E402

BASELINE = "prenorm"

# name -> (display label, ModelConfig overrides)
CONFIGS: dict[str, tuple[str, dict]] = {
    "prenorm": ("prenorm (fp)", dict(pathway="prenorm")),
    **{f"shc{n}": (f"SHC x{n}", dict(pathway="hc", expansion_rate=n, hc_dynamic=False)) for n in (1, 2, 4, 8)},
    **{f"dhc{n}": (f"DHC x{n}", dict(pathway="hc", expansion_rate=n, hc_dynamic=True)) for n in (1, 2, 4, 8)},
    "prenorm_bitnet": ("prenorm + BitLinear", dict(pathway="prenorm", linear="bitnet")),
    "dhc4_bitnet": ("DHC x4 + BitLinear", dict(pathway="hc", expansion_rate=4, hc_dynamic=True, linear="bitnet")),
}

# (target name, config, metric, threshold, description)
TARGETS = [
    ("dhc4_step", "dhc4", "step", 1.10, "DHC x4 step time <= 1.10x prenorm"),
    ("dhc4_peak_memory", "dhc4", "peak_memory", 1.30, "DHC x4 peak memory <= 1.30x prenorm"),
    ("bitlinear_step", "prenorm_bitnet", "step", 1.35, "BitLinear (prenorm) step time <= 1.35x fp"),
]

FULL = dict(model_overrides={}, seq_len=256, batch_size=8, rounds=7)
QUICK = dict(model_overrides=dict(dim=64, n_layers=2, max_seq_len=64), seq_len=64, batch_size=2, rounds=2)
MEMORY_STEPS = 3
DEFAULT_OUT = C.RESULTS_DIR / "pathway_overhead.json"
DEFAULT_OUT_QUICK = C.RESULTS_DIR / "pathway_overhead_quick.json"
DEFAULT_OUT_COMPILE = C.RESULTS_DIR / "pathway_overhead_compile.json"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model (d 64, 2 blocks, seq 64, batch 2, 2 rounds) for smoke tests")
    ap.add_argument("--configs", default=None,
                    help=f"comma list, subset of: {','.join(CONFIGS)} (prenorm is always included)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--compile", action="store_true",
                    help="time torch.compile'd models (every config alike; memory columns stay eager)")
    ap.add_argument("--out", default=None,
                    help=f"JSON path (default {DEFAULT_OUT.relative_to(C.REPO_ROOT)}, "
                         f"or {DEFAULT_OUT_QUICK.relative_to(C.REPO_ROOT)} with --quick)")
    ap.add_argument("--measure-memory", metavar="CONFIG", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or (args.rounds is not None and args.rounds < 1):
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in CONFIGS]
        if unknown:
            ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    else:
        names = list(CONFIGS)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    args.config_names = list(dict.fromkeys(names))
    if args.measure_memory is not None and args.measure_memory not in CONFIGS:
        ap.error(f"unknown config {args.measure_memory!r}")
    return args


def settings(args) -> dict:
    s = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        s["rounds"] = args.rounds
    s.update(steps=args.steps, warmup=args.warmup, quick=args.quick, device=args.device,
             threads=args.threads, precision=C.precision(args.device), preset="small", lr=1e-3,
             optimizer="hyperbit.make_optimizer (AdamW)", memory_steps=MEMORY_STEPS,
             compile=args.compile)
    return s


def model_config(name: str, s: dict) -> hyperbit.ModelConfig:
    return hyperbit.preset(s["preset"], **s["model_overrides"], **CONFIGS[name][1])


def make_batch(cfg_vocab: int, s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shape = (s["batch_size"], s["seq_len"])
    idx = torch.randint(0, cfg_vocab, shape, generator=g)
    targets = torch.randint(0, cfg_vocab, shape, generator=g)
    return idx.to(s["device"]), targets.to(s["device"])


def build(name: str, s: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = hyperbit.build_model(model_config(name, s), device=s["device"])
    model.train()
    return model


# --- child: peak memory of one configuration --------------------------------------------------

def _runtime_warmup(name: str, s: dict) -> None:
    """One training step of a throwaway model of the same kind (d 16, 1 block, 8 tokens) so the
    lazily initialised runtime (kernel code pages, thread pools, oneDNN, autograd engine) is
    resident before the second baseline. Its own tensors are a few KiB."""
    over = {**CONFIGS[name][1], "dim": 16, "n_layers": 1, "max_seq_len": 8}
    torch.manual_seed(0)
    model = hyperbit.build_model(hyperbit.preset(s["preset"], **over), device=s["device"])
    idx = torch.randint(0, model.cfg.vocab_size, (1, 8), device=s["device"])
    opt = hyperbit.make_optimizer(model, lr=s["lr"])
    C.make_train_step(model, opt, idx, idx, s["device"])()
    del model, opt, idx


def measure_memory_child(name: str, s: dict) -> dict:
    """Peak memory of ``MEMORY_STEPS`` training steps of one configuration, in a fresh process.

    ``peak_step_bytes`` (the headline number): CPU - peak RSS over the steps minus VmRSS right
    after importing torch and building the input batch; CUDA - peak allocated minus allocated at
    that point. ``peak_step_warm_bytes`` subtracts instead the memory after a tiny same-kind
    warm-up step, which removes most of the constant cost of lazily initialising the runtime.

    The CPU peak is ``VmHWM`` (reset after the warm-up via /proc/self/clear_refs), not
    ``ru_maxrss``: a subprocess's ``ru_maxrss`` includes the parent's peak RSS (see
    :func:`_common.maxrss_bytes`), which here is the parent holding every model.
    """
    import gc

    dev = s["device"]
    cfg = model_config(name, s)
    idx, targets = make_batch(cfg.vocab_size, s)
    out: dict = {"config": name, "source_digest": C.source_digest()}
    cuda = dev == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        now = torch.cuda.memory_allocated
    else:
        now = C.current_rss_bytes
        out["status_at_baseline"] = C.proc_status_bytes("VmRSS", "VmHWM", "RssAnon", "RssFile")
    base = now()
    out["baseline_bytes"] = base
    _runtime_warmup(name, s)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        out["peak_reset"] = C.reset_peak_rss()
    warm = now()
    out["runtime_init_bytes"] = warm - base

    model = build(name, s)
    out["after_model_bytes"] = now() - base
    opt = hyperbit.make_optimizer(model, lr=s["lr"])
    out["after_optimizer_bytes"] = now() - base
    step = C.make_train_step(model, opt, idx, targets, dev)
    for _ in range(MEMORY_STEPS):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["method"] = "cuda max_memory_allocated over the steps - allocated after the input batch"
    else:
        peak = C.peak_rss_bytes()
        out["status_at_end"] = C.proc_status_bytes("VmRSS", "VmHWM", "RssAnon", "RssFile")
        out["ru_maxrss_bytes"] = C.maxrss_bytes()  # reference only: includes the parent's peak
        out["method"] = ("VmHWM (reset after warm-up) at the end - VmRSS after import torch + "
                         "input batch")
    out["after_steps_bytes"] = now() - base
    out["peak_step_bytes"] = peak - base
    out["peak_step_warm_bytes"] = peak - warm
    out["params"] = model.num_params()
    return out


# --- parent -----------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_memory(names: list[str], args, s: dict) -> dict[str, dict]:
    res = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-memory", name,
               "--device", args.device, "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        res[name] = C.run_json_child(cmd, env=env)
        log(f"  memory {name:<15} {res[name]['peak_step_bytes'] / C.MIB:9.1f} MiB "
            f"({time.perf_counter() - t0:.1f}s)")
    return res


def evaluate_targets(results: dict[str, dict], quick: bool) -> list[dict]:
    out = []
    for tname, cfg, metric, threshold, desc in TARGETS:
        r = results.get(cfg)
        value = None if r is None else r[metric]["ratio_vs_prenorm"]
        passed = None if value is None else bool(value <= threshold)
        entry = {"name": tname, "description": desc, "config": cfg, "metric": metric,
                 "ratio": value, "threshold": threshold, "passed": passed}
        if value is None:
            entry["note"] = "configuration not run"
        elif quick:
            entry["note"] = "quick mode: tiny model, not representative"
        out.append(entry)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args)
    if args.measure_memory is not None:
        C.report_to_parent(measure_memory_child(args.measure_memory, s))
        return 0

    t_start = time.perf_counter()
    names = args.config_names
    info = C.machine_info(args.device)
    log(f"pathway_overhead: {len(names)} configs, {s['rounds']} rounds x {s['steps']} steps, "
        f"batch {s['batch_size']} x seq {s['seq_len']}, {args.threads} threads, {args.device}"
        + (" [quick]" if args.quick else ""))

    # Build every model once; saved-activation bytes first (one forward each, graph dropped).
    idx, targets = make_batch(model_config(BASELINE, s).vocab_size, s)
    models, step_fns, optims, saved, params, cfgs = {}, {}, {}, {}, {}, {}
    for name in names:
        model = build(name, s)
        cfgs[name] = model.cfg.to_dict()
        params[name] = model.num_params()

        def fwd(model=model):
            with C.autocast(args.device):
                return model(idx, targets)[1]

        saved[name] = C.saved_activation_bytes(model, fwd, exclude=[idx, targets])
        opt = hyperbit.make_optimizer(model, lr=s["lr"])
        models[name], optims[name] = model, opt
        runner = torch.compile(model) if s["compile"] else model
        step_fns[name] = C.make_train_step(runner, opt, idx, targets, args.device)

    sync = torch.cuda.synchronize if args.device == "cuda" else None
    log(f"  warmup ({s['warmup']} steps each)")
    C.warmup(step_fns, s["warmup"])
    if sync:
        sync()
    t0 = time.perf_counter()
    times = C.interleaved_timing(
        step_fns, s["rounds"], s["steps"], sync=sync,
        after_config=lambda n: optims[n].zero_grad(set_to_none=True),
        progress=lambda r, R: log(f"  round {r}/{R} ({time.perf_counter() - t0:.0f}s)"))
    del models, step_fns, optims

    log("  peak memory (one subprocess per config)")
    mem = measure_memory(names, args, s)

    # --- assemble -----------------------------------------------------------------------------
    base_ms = C.median(t * 1e3 for rnd in times[BASELINE] for t in rnd)
    base_round = [C.median(rnd) for rnd in times[BASELINE]]
    base_mem = mem[BASELINE]["peak_step_bytes"]
    base_mem_warm = mem[BASELINE]["peak_step_warm_bytes"]
    base_act = saved[BASELINE]["bytes"]
    results = {}
    for name in names:
        flat_ms = [t * 1e3 for rnd in times[name] for t in rnd]
        summary = C.summarize(flat_ms)
        paired = [C.ratio(C.median(rnd), b) for rnd, b in zip(times[name], base_round)]
        results[name] = {
            "label": CONFIGS[name][0],
            "model_config": cfgs[name],
            "params": params[name],
            "step": {
                "median_ms": summary["median"],
                "ratio_vs_prenorm": C.ratio(summary["median"], base_ms),
                "paired_round_ratio_median": C.median(p for p in paired if p is not None),
                "summary_ms": summary,
                "raw_ms_per_round": [[t * 1e3 for t in rnd] for rnd in times[name]],
            },
            "peak_memory": {
                "mib": mem[name]["peak_step_bytes"] / C.MIB,
                "ratio_vs_prenorm": C.ratio(mem[name]["peak_step_bytes"], base_mem),
                "warm_mib": mem[name]["peak_step_warm_bytes"] / C.MIB,
                "warm_ratio_vs_prenorm": C.ratio(mem[name]["peak_step_warm_bytes"], base_mem_warm),
                **mem[name],
            },
            "saved_activations": {
                "mib": saved[name]["bytes"] / C.MIB,
                "ratio_vs_prenorm": C.ratio(saved[name]["bytes"], base_act),
                **saved[name],
            },
        }
    targets_eval = evaluate_targets(results, args.quick)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["source_digest_end"] = C.source_digest()

    # --- report -------------------------------------------------------------------------------
    headers = ["config", "step ms (median)", "x prenorm", "peak MiB", "x prenorm",
               "saved-act MiB", "x prenorm", "peak-init MiB", "x prenorm"]
    rows = [[r["label"], C.fmt(r["step"]["median_ms"]), C.fmt(r["step"]["ratio_vs_prenorm"], ".3f"),
             C.fmt(r["peak_memory"]["mib"], ".1f"), C.fmt(r["peak_memory"]["ratio_vs_prenorm"], ".3f"),
             C.fmt(r["saved_activations"]["mib"], ".1f"),
             C.fmt(r["saved_activations"]["ratio_vs_prenorm"], ".3f"),
             C.fmt(r["peak_memory"]["warm_mib"], ".1f"),
             C.fmt(r["peak_memory"]["warm_ratio_vs_prenorm"], ".3f")] for r in results.values()]
    print(f"\npathway overhead: batch {s['batch_size']} x seq {s['seq_len']}, "
          f"d {cfgs[BASELINE]['dim']}, {cfgs[BASELINE]['n_layers']} blocks, {C.precision(args.device)}, "
          f"{args.threads} threads, {args.device} ({info['cpu_model'] if args.device == 'cpu' else info.get('cuda_device')})"
          f"; {s['rounds']} rounds x {s['steps']} steps" + ("  [QUICK]" if args.quick else ""))
    print(C.format_table(headers, rows))
    print(("peak: peak RSS (VmHWM) over 3 steps - RSS after import+batch (fresh process per config); "
           "peak-init: same, baseline after a tiny warm-up step (runtime start-up excluded); "
           if args.device == "cpu" else
           "peak: max_memory_allocated over 3 steps - allocated before the model (fresh process per "
           "config); ") + "saved-act: bytes saved for backward by one forward")
    digests = {m.get("source_digest") for m in mem.values()} | {info["source_digest"], info["source_digest_end"]}
    info["source_changed_during_run"] = len(digests) > 1
    out_path = Path(args.out) if args.out else (
        DEFAULT_OUT_QUICK if args.quick else DEFAULT_OUT_COMPILE if args.compile else DEFAULT_OUT)
    C.finish("pathway_overhead", info, targets_eval, out_path, quick=args.quick,
             source_changed=len(digests) > 1, settings=s, baseline=BASELINE, configs=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

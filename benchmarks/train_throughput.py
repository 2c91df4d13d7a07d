"""Throughput of ``hyperbit train`` against a bare PyTorch loop on the same model, batch and precision.

Claim: a ``hyperbit train`` step costs no more than a bare loop; target tokens/s >= 0.95x the bare
loop, per pathway (reported as pass/fail, never an error exit).

Both sides, in one process, on the same data and model config:

    hyperbit   ``hyperbit.train.train(cfg, run_dir)``, the function behind ``hyperbit train``,
               unmodified: LR schedule, batches from ``TokenShards.get_batch``, the precision
               ``train.precision=auto`` resolves to (bf16 autocast where native, else fp32),
               backward, grad clipping, non-finite guard, AdamW step, metrics.jsonl every
               ``train.log_every`` steps (the preset's value), progress lines, and one final
               evaluation + checkpoint (``train.eval_every=0``, ``train.save_every=0``).
    bare       the same model (``build_model(cfg.model)``, same seed), ``torch.optim.AdamW`` with
               the same param groups (``hyperbit.train.param_groups``) and hyper-parameters, the
               same batches from ``TokenShards.get_batch``, the same precision, backward,
               ``clip_grad_norm_``, step, ``zero_grad`` - nothing else (constant LR, no logging,
               no evaluation, no checkpoint).

Method
    * The data is prepared once beforehand (``hyperbit.data.prepare('pystdlib', dir,
      max_bytes=<preset's data.max_bytes>)``) and passed as ``data.path=<dir>``, so no run tokenises.
    * Steady step time by difference: each side is run as a whole for N1 and for N2 steps (N2 > N1)
      and timed from the call to the return; ``(T(N2) - T(N1)) / (N2 - N1)`` is the per-step time
      with start-up (run dir, data open, model build, optimizer), the final evaluation and the
      checkpoint cancelled. tokens/s = batch_size * seq_len / that time.
    * Rounds: every round runs all (pathway, side, N) combinations, each in a fresh run directory
      and with a freshly built model; odd rounds run them in reverse order, so slow drift of a
      shared machine hits both sides alike. One untimed N1 run of each side and pathway first.
      Reported: the median over rounds of the per-round difference estimates, and the ratio
      hyperbit / bare of the tokens/s (also the median of per-round paired ratios).
    * Cross-check ("in-run"): the step rate inside the N2 runs, from the timestamps of the
      progress lines ``train()`` logs (hyperbit) and of the end of the first and last step (bare).
      It does not depend on the difference of two noisy wall times.
    * Start-up of ``hyperbit train``: time from calling ``train()`` to the end of the first step
      minus one steady step (run dir, data, model, optimizer), the final evaluation + checkpoint
      (last progress line to return), and the fixed cost ``T(N1) - N1 * steady``. The CLI process
      start: wall time of ``python -m hyperbit.cli train --dry-run --preset demo`` (median of
      ``--cli-repeats``), next to ``python -c "import torch"`` for reference.
    * ``train()`` runs with a log callback (as the CLI does with output not on a terminal);
      stderr is redirected while it runs so its progress bar never takes the terminal path.

    python benchmarks/train_throughput.py                       # full run (several minutes on CPU)
    python benchmarks/train_throughput.py --quick               # tiny preset, smoke test
    python benchmarks/train_throughput.py --pathways hc --rounds 7 --steps 10,60

Second claim, ``--models``: the step time of hyperbit's models against a plain PyTorch GPT of the
same shape (``_common.build_plain_gpt``), eager and with regional compile
(``hyperbit.models.compile_blocks``): plain GPT, Pre-Norm, SHC x4, DHC x4, Pre-Norm + BitLinear, mHC x4, frac x2, frac x4 at
d 256 x 6 blocks, batch 8 x seq 256, in the precision ``train.precision=auto`` picks. One process,
every model built side by side, steps timed round-robin (``_common.interleaved_timing``), medians
of per-round medians; memory is the bytes autograd saves in one forward. The CPU allocator is set as
``hyperbit train`` sets it (``hyperbit.train.allocator``). Mode ``compiled-plain``
compiles DHC x4 with plain-autograd hyper-connections instead of the custom autograd nodes that
``compile_blocks`` keeps by default (the comparison that chose the default); mode ``eager-pytorch``
runs SHC x4, DHC x4 and mHC x4 with the C kernels off (``HYPERBIT_NATIVE=0``: the PyTorch
implementation of the same nodes, the path on CUDA), so the kernels' effect is measured side by side. Targets: DHC x4 <= 1.20x Pre-Norm eager, <= 1.10x
compiled.

    python benchmarks/train_throughput.py --models              # full (compiles: ~10+ min on 2 cores)
    python benchmarks/train_throughput.py --models --quick --modes eager
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

from hyperbit.data import TokenShards, prepare  # noqa: E402
from hyperbit.models import build_model  # noqa: E402
from hyperbit.train import param_groups  # noqa: E402
from hyperbit.train import RUN_PRESETS, RunConfig, resolve_run_config  # noqa: E402
from hyperbit.train import train  # noqa: E402
from hyperbit.train.precision import autocast as precision_autocast  # noqa: E402
from hyperbit.train.precision import resolve_precision  # noqa: E402

# name -> (display label, model.* overrides on top of the run preset)
PATHWAYS: dict[str, tuple[str, list[str]]] = {
    "hc": ("DHC x4", ["model.pathway=hc", "model.expansion_rate=4", "model.hc_dynamic=true"]),
    "shc": ("SHC x4", ["model.pathway=hc", "model.expansion_rate=4", "model.hc_dynamic=false"]),
    "prenorm": ("prenorm", ["model.pathway=prenorm", "model.expansion_rate=1"]),
}
TARGET_RATIO = 0.95
SIDES = ("hyperbit", "bare")

FULL = dict(preset="demo", steps=(10, 40), rounds=5, cli_repeats=3)
QUICK = dict(preset="tiny", steps=(3, 11), rounds=2, cli_repeats=3)
DEFAULT_OUT = C.RESULTS_DIR / "train_throughput.json"
DEFAULT_OUT_QUICK = C.RESULTS_DIR / "train_throughput_quick.json"
CLI_CMD = ["-m", "hyperbit.cli", "train", "--dry-run", "--preset", "demo"]
PROGRESS_RE = re.compile(r"\]\s+(\d+)/(\d+)\s")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"timing rounds (default {FULL['rounds']}; {QUICK['rounds']} with --quick)")
    ap.add_argument("--steps", default=None,
                    help="N1,N2: steps of the short and the long run (default "
                         f"{FULL['steps'][0]},{FULL['steps'][1]}; {QUICK['steps'][0]},{QUICK['steps'][1]} "
                         "with --quick)")
    ap.add_argument("--pathways", default="hc,prenorm",
                    help=f"comma list, subset of: {','.join(PATHWAYS)} (default hc,prenorm)")
    ap.add_argument("--quick", action="store_true",
                    help="the 'tiny' run preset (d 32, 2 blocks, batch 4 x seq 32), few steps, 2 rounds")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="train.device for both sides (default auto, as hyperbit train)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default, as hyperbit train)")
    ap.add_argument("--cli-repeats", type=int, default=None,
                    help=f"runs of the CLI start-up measurement (default {FULL['cli_repeats']})")
    ap.add_argument("--out", default=None,
                    help=f"JSON path (default {DEFAULT_OUT.relative_to(C.REPO_ROOT)}, "
                         f"or {DEFAULT_OUT_QUICK.relative_to(C.REPO_ROOT)} with --quick)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    if args.steps is None:
        args.n1, args.n2 = base["steps"]
    else:
        try:
            args.n1, args.n2 = (int(v) for v in args.steps.split(","))
        except ValueError:
            ap.error(f"--steps must look like N1,N2 (two integers), got {args.steps!r}")
    if not 1 <= args.n1 < args.n2:
        ap.error(f"--steps needs 1 <= N1 < N2, got {args.n1},{args.n2}")
    args.rounds = base["rounds"] if args.rounds is None else args.rounds
    args.cli_repeats = base["cli_repeats"] if args.cli_repeats is None else args.cli_repeats
    if args.rounds < 1 or args.cli_repeats < 0:
        ap.error("--rounds must be >= 1 and --cli-repeats >= 0")
    names = [p.strip() for p in args.pathways.split(",") if p.strip()]
    unknown = [p for p in names if p not in PATHWAYS]
    if unknown or not names:
        ap.error(f"unknown or no pathway(s) {unknown}; choose from {list(PATHWAYS)}")
    args.pathway_names = list(dict.fromkeys(names))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    args.preset = base["preset"]
    return args


def run_config(args, pathway: str, steps: int, data_dir: Path) -> RunConfig:
    warmup = min(RUN_PRESETS[args.preset]["train"].get("warmup_steps", 30), args.n1)
    overrides = [*PATHWAYS[pathway][1], f"train.steps={steps}", f"train.warmup_steps={warmup}",
                 "train.eval_every=0", "train.save_every=0", f"train.device={args.device}",
                 f"data.path={data_dir}"]
    cfg = resolve_run_config(args.preset, overrides)
    # both sides compute in the precision `hyperbit train` resolves `auto` to on this device
    cfg.train.precision = resolve_precision(cfg.train.precision, resolve_device(cfg))
    return cfg


def resolve_device(cfg: RunConfig) -> torch.device:
    d = cfg.train.device
    return torch.device("cuda" if d == "cuda" or (d == "auto" and torch.cuda.is_available()) else "cpu")


# --- the two sides ----------------------------------------------------------------------------

def run_hyperbit(cfg: RunConfig, work: Path) -> dict:
    """``train(cfg)`` into a fresh run directory; wall time and progress-line timestamps."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    shutil.rmtree(out)  # train() creates it
    lines: list[tuple[float, str]] = []

    def collect(line: str) -> None:
        lines.append((time.perf_counter(), line))

    gc.collect()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            t0 = time.perf_counter()
            result = train(cfg, out, log=collect)
            t1 = time.perf_counter()
    except BaseException:
        sys.stderr.write(captured.getvalue()[-4000:])
        raise
    finally:
        shutil.rmtree(out, ignore_errors=True)
    marks = []  # (step done, time) of every progress line
    for t, line in lines:
        m = PROGRESS_RE.search(line)
        if m:
            marks.append((int(m.group(1)), t))
    if not marks or marks[-1][0] != cfg.train.steps:
        raise RuntimeError(f"train() logged no progress line for its last step: {lines[-3:]}")
    (k, t_first), (n, t_last) = marks[0], marks[-1]
    return {"wall_s": t1 - t0, "steps": n, "first_mark_step": k, "first_mark_s": t_first - t0,
            "last_mark_s": t_last - t0, "in_run_step_s": (t_last - t_first) / (n - k) if n > k else None,
            "final_eval_save_s": t1 - t_last, "loss": result.get("loss"), "val_loss": result.get("val_loss")}


def run_bare(cfg: RunConfig, data_dir: Path) -> dict:
    """The bare loop: same model, optimizer groups, batches and precision, nothing else."""
    gc.collect()
    t = cfg.train
    t0 = time.perf_counter()
    device = resolve_device(cfg)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = TokenShards(data_dir, "train")
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), fused=device.type == "cuda" or None)
    autocast = precision_autocast(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    micro = t.batch_size // t.grad_accum
    t_first = None
    for step in range(t.steps):
        for m in range(t.grad_accum):
            x, y = data.get_batch(step * t.grad_accum + m, micro, t.seq_len, seed=t.seed)
            with autocast:
                loss = model(x.to(device), y.to(device))[1] / t.grad_accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if t.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            sync()
            t_first = time.perf_counter()
    sync()
    t1 = time.perf_counter()
    n = t.steps
    return {"wall_s": t1 - t0, "steps": n, "first_mark_step": 1, "first_mark_s": t_first - t0,
            "last_mark_s": t1 - t0, "in_run_step_s": (t1 - t_first) / (n - 1) if n > 1 else None,
            "loss": float(loss.detach()) * t.grad_accum}


# --- CLI start-up -----------------------------------------------------------------------------

def time_command(cmd: list[str], repeats: int) -> list[float]:
    env = dict(os.environ)
    src = str(C.REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=C.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return walls


# --- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--models" in argv:
        return models_main([a for a in argv if a != "--models"])
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    n1, n2 = args.n1, args.n2
    names = args.pathway_names
    probe = run_config(args, names[0], n1, Path("."))
    device = resolve_device(probe)
    info = C.machine_info(str(device))
    tokens_per_step = probe.train.batch_size * probe.train.seq_len
    settings = {"quick": args.quick, "preset": args.preset, "rounds": args.rounds, "steps": [n1, n2],
                "pathways": names, "device": str(device), "threads": torch.get_num_threads(),
                "threads_flag": args.threads, "cli_repeats": args.cli_repeats,
                "batch_size": probe.train.batch_size, "seq_len": probe.train.seq_len,
                "grad_accum": probe.train.grad_accum, "tokens_per_step": tokens_per_step,
                "precision": probe.train.precision, "log_every": probe.train.log_every,
                "eval_every": 0, "save_every": 0, "eval_batches": probe.train.eval_batches,
                "data_max_bytes": probe.data.max_bytes, "target_ratio": TARGET_RATIO}
    log(f"train_throughput: preset {args.preset}, pathways {','.join(names)}, {args.rounds} rounds, "
        f"N1={n1} N2={n2}, batch {probe.train.batch_size} x seq {probe.train.seq_len}, "
        f"{torch.get_num_threads()} threads, {device}" + (" [quick]" if args.quick else ""))

    work = Path(tempfile.mkdtemp(prefix="hyperbit-train-throughput-"))
    try:
        data_dir = work / "data"
        t0 = time.perf_counter()
        meta = prepare("pystdlib", data_dir, max_bytes=probe.data.max_bytes or None)
        data_info = {"source": "pystdlib", "max_bytes": probe.data.max_bytes,
                     "prepare_s": time.perf_counter() - t0,
                     "tokens": meta["tokens"], "tokenizer": meta["tokenizer"]["kind"]}
        log(f"  data prepared in {data_info['prepare_s']:.1f}s: {data_info['tokens']}")

        cfgs = {(p, n): run_config(args, p, n, data_dir) for p in names for n in (n1, n2)}

        def run(p: str, side: str, n: int) -> dict:
            cfg = cfgs[(p, n)]
            return run_hyperbit(cfg, work) if side == "hyperbit" else run_bare(cfg, data_dir)

        log("  warm-up (one untimed N1 run of each side and pathway)")
        for p in names:
            for side in SIDES:
                run(p, side, n1)

        units = [(p, side, n) for p in names for side in SIDES for n in (n1, n2)]
        raw: dict[tuple[str, str, int], list[dict]] = {u: [] for u in units}
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for u in (units if r % 2 == 0 else units[::-1]):
                raw[u].append(run(*u))
            log(f"  round {r + 1}/{args.rounds} ({time.perf_counter() - t0:.0f}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cli = {"command": ["python", *CLI_CMD], "repeats": args.cli_repeats}
    if args.cli_repeats:
        log(f"  CLI start-up ({args.cli_repeats}x each)")
        cli["wall_s"] = time_command([sys.executable, *CLI_CMD], args.cli_repeats)
        cli["median_s"] = C.median(cli["wall_s"])
        cli["import_torch_wall_s"] = time_command([sys.executable, "-c", "import torch"], args.cli_repeats)
        cli["import_torch_median_s"] = C.median(cli["import_torch_wall_s"])

    # --- assemble -----------------------------------------------------------------------------
    results = {}
    for p in names:
        cfg = cfgs[(p, n1)]
        entry: dict = {"label": PATHWAYS[p][0], "overrides": PATHWAYS[p][1],
                       "model_config": cfg.model.to_dict(),
                       "params": sum(x.numel() for x in build_model(cfg.model, device="meta").parameters())}
        per_round_step = {}
        for side in SIDES:
            short, long_ = raw[(p, side, n1)], raw[(p, side, n2)]
            diffs = [(b["wall_s"] - a["wall_s"]) / (n2 - n1) for a, b in zip(short, long_)]
            per_round_step[side] = diffs
            step_s = C.median(diffs)
            in_run = C.median(x["in_run_step_s"] for x in long_ if x["in_run_step_s"] is not None)
            startup = [x["first_mark_s"] - x["first_mark_step"] * step_s for x in short + long_]
            s = {
                "step_ms": step_s * 1e3,
                "tokens_per_s": tokens_per_step / step_s if step_s > 0 else None,
                "step_ms_per_round": [d * 1e3 for d in diffs],
                "step_ms_summary": C.summarize(d * 1e3 for d in diffs),
                # (p75 - p25) / median of the per-round difference estimates: their stability
                "step_relative_iqr": C.ratio(C.summarize(diffs)["p75"] - C.summarize(diffs)["p25"], step_s),
                "in_run_step_ms": in_run * 1e3,
                "in_run_tokens_per_s": tokens_per_step / in_run if in_run > 0 else None,
                # difference estimate / in-run estimate: ~1 when the difference method is sound
                "difference_vs_in_run": C.ratio(step_s, in_run),
                "startup_to_first_step_s": C.median(startup),
                "fixed_overhead_s": C.median(a["wall_s"] - n1 * step_s for a in short),
                "wall_s": {str(n1): [a["wall_s"] for a in short], str(n2): [b["wall_s"] for b in long_]},
                "final_loss": {str(n1): short[-1]["loss"], str(n2): long_[-1]["loss"]},
            }
            if side == "hyperbit":
                s["final_eval_save_s"] = C.median(x["final_eval_save_s"] for x in short + long_)
            entry[side] = s
        hb, bare = entry["hyperbit"], entry["bare"]
        entry["ratio_tokens_per_s"] = C.ratio(hb["tokens_per_s"], bare["tokens_per_s"])
        # per round: bare step / hyperbit step (= tokens/s ratio); rounds where noise made either
        # difference non-positive are left out
        paired = [b / h for h, b in zip(per_round_step["hyperbit"], per_round_step["bare"]) if h > 0 and b > 0]
        entry["paired_round_ratio_median"] = C.median(x for x in paired if x is not None)
        entry["paired_round_ratios"] = paired
        entry["in_run_ratio_tokens_per_s"] = C.ratio(hb["in_run_tokens_per_s"], bare["in_run_tokens_per_s"])
        results[p] = entry

    targets = []
    for p, e in results.items():
        value = e["ratio_tokens_per_s"]
        t = {"name": f"{p}_tokens_per_s", "pathway": p,
             "description": f"hyperbit train tokens/s >= {TARGET_RATIO}x bare loop ({e['label']})",
             "ratio": value, "threshold": TARGET_RATIO,
             "passed": None if value is None else bool(value >= TARGET_RATIO)}
        if args.quick:
            t["note"] = "quick mode: tiny model, not representative"
        targets.append(t)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["source_digest_end"] = C.source_digest()
    info["source_changed_during_run"] = info["source_digest_end"] != info["source_digest"]

    # --- report -------------------------------------------------------------------------------
    print(f"\ntrain throughput: preset {args.preset}, batch {probe.train.batch_size} x seq "
          f"{probe.train.seq_len} ({tokens_per_step} tokens/step), {probe.train.precision}, "
          f"{torch.get_num_threads()} threads, {device} "
          f"({info['cpu_model'] if device.type == 'cpu' else info.get('cuda_device')}); "
          f"{args.rounds} rounds, steady step = (T(N2) - T(N1)) / (N2 - N1), N1={n1}, N2={n2}"
          + ("  [QUICK]" if args.quick else ""))
    headers = ["pathway", "side", "step ms", "IQR/med", "tokens/s", "x bare", "in-run tok/s", "x bare",
               "start-up s", "fixed s"]
    rows = []
    for e in results.values():
        for side in SIDES:
            s = e[side]
            hb = side == "hyperbit"
            rows.append([e["label"], side, C.fmt(s["step_ms"]), C.fmt(s["step_relative_iqr"], ".3f"),
                         C.fmt(s["tokens_per_s"], ",.0f"),
                         C.fmt(e["ratio_tokens_per_s"], ".3f") if hb else "1.000",
                         C.fmt(s["in_run_tokens_per_s"], ",.0f"),
                         C.fmt(e["in_run_ratio_tokens_per_s"], ".3f") if hb else "1.000",
                         C.fmt(s["startup_to_first_step_s"], ".3f"), C.fmt(s["fixed_overhead_s"], ".3f")])
    print(C.format_table(headers, rows))
    print("step ms: median over rounds of (T(N2) - T(N1)) / (N2 - N1); IQR/med: spread of those per-round "
          "estimates; in-run: step rate inside the N2 runs (cross-check); start-up: call to end of first "
          "step minus one steady step (run dir, data, model, optimizer); fixed: T(N1) - N1 x steady step "
          "(start-up + hyperbit's final eval and checkpoint)")
    for e in results.values():
        final = C.fmt(e["hyperbit"]["final_eval_save_s"], ".3f")
        print(f"  {e['label']}: hyperbit final eval + checkpoint {final}s; "
              f"paired per-round ratio median {C.fmt(e['paired_round_ratio_median'], '.3f')} "
              f"(rounds: {', '.join(C.fmt(x, '.3f') for x in e['paired_round_ratios'])})")
    if args.cli_repeats:
        print(f"CLI start: `python {' '.join(CLI_CMD)}` {C.fmt(cli['median_s'], '.3f')}s "
              f"(median of {args.cli_repeats}; `python -c 'import torch'` "
              f"{C.fmt(cli['import_torch_median_s'], '.3f')}s)")
    for e in results.values():
        for side in SIDES:
            x = e[side]
            if x["tokens_per_s"] is None or not 0.8 <= (x["difference_vs_in_run"] or 0) <= 1.25:
                msg = (f"WARNING: {e['label']} {side}: the difference estimate ({C.fmt(x['step_ms'])} ms) and the "
                       f"in-run step time ({C.fmt(x['in_run_step_ms'])} ms) disagree; noise exceeds "
                       f"N2 - N1 = {n2 - n1} steps: raise --steps N2 or --rounds")
                print(msg)
                info.setdefault("stability_warnings", []).append(msg)
    out_path = Path(args.out) if args.out else (DEFAULT_OUT_QUICK if args.quick else DEFAULT_OUT)
    C.finish("train_throughput", info, targets, out_path, quick=args.quick,
             source_changed=info["source_changed_during_run"], settings=settings, data=data_info,
             pathways=results, cli=cli)
    return 0


# --- --models: hyperbit's models against a plain GPT, eager and compiled ---------------------------

MODEL_SHAPE = dict(vocab_size=256, dim=256, n_layers=6, n_heads=4, seq_len=256, batch=8)
MODEL_SHAPE_QUICK = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, seq_len=16, batch=2)


def models_main(argv) -> int:
    ap = argparse.ArgumentParser(description="step time of hyperbit's models against a plain GPT (CPU)")
    ap.add_argument("--quick", action="store_true", help="d 32 x 2 blocks, batch 2 x seq 16, 1 round")
    ap.add_argument("--models-list", default=",".join(C.STEP_MODELS), help="comma list of "
                    f"{','.join(C.STEP_MODELS)}")
    ap.add_argument("--modes", default="eager,compiled,compiled-plain",
                    help="comma list of eager, compiled, compiled-plain, eager-pytorch")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 4; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 2; 1 with --quick)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    models = [m for m in args.models_list.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in models if m not in C.STEP_MODELS] + [m for m in modes if m not in ("eager", "compiled", "compiled-plain", "eager-pytorch")]
    if bad or not models or not modes:
        ap.error(f"unknown or no models / modes {bad}; models: {list(C.STEP_MODELS)}, modes: eager, compiled, compiled-plain, eager-pytorch")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = MODEL_SHAPE_QUICK if args.quick else MODEL_SHAPE
    rounds = args.rounds or (1 if args.quick else 4)
    steps = args.steps or (1 if args.quick else 2)
    info = C.machine_info("cpu")
    info["avx512_bf16"] = "avx512_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    C.allocator_as_train(info)
    prec = C.precision("cpu")
    log(f"train_throughput --models: {models} x {modes}, {shape}, {prec}, {torch.get_num_threads()} threads")
    results = C.measure_steps(models, modes, shape, "cpu", None, rounds, steps, warmup_steps=1, log=log,
                              compile_kwargs={"backend": args.backend})
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    print(f"\nstep time: d {shape['dim']} x {shape['n_layers']} blocks, batch {shape['batch']} x seq "
          f"{shape['seq_len']}, {prec}, {torch.get_num_threads()} threads, {info['cpu_model']} "
          f"(avx512_bf16: {info['avx512_bf16']}); {rounds} rounds x {steps} steps, interleaved"
          + ("  [QUICK]" if args.quick else ""))
    print(C.format_table(*C.step_table(results, "saved_bytes")))
    print("step ms: median of per-round medians; x Pre-Norm: against Pre-Norm in the same mode "
          "(compiled-plain against compiled, eager-pytorch against eager); saved: bytes autograd keeps for backward in one forward")
    targets = [C.step_target(results, "dhc4", "eager", 1.20), C.step_target(results, "dhc4", "compiled", 1.10),
               C.step_target(results, "dhc4", "eager", 1.15, what="saved_bytes"),
               C.step_target(results, "mhc4", "eager", 1.35), C.step_target(results, "mhc4", "compiled", 1.35),
               C.step_target(results, "frac2", "eager", 1.05, what="saved_bytes"),
               C.step_target(results, "frac4", "eager", 1.05, what="saved_bytes"),
               C.step_target(results, "prenorm", "eager", 1.0, base="plain"),
               C.step_target(results, "prenorm", "compiled", 1.0, base="plain")]
    default = C.RESULTS_DIR / ("train_throughput_models_quick.json" if args.quick else "train_throughput_models.json")
    C.finish("train_throughput_models", info, targets, Path(args.out) if args.out else default, quick=args.quick,
             source_changed=False, settings={"shape": shape, "precision": prec, "rounds": rounds, "steps": steps,
                                             "backend": args.backend, "threads": torch.get_num_threads()},
             results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

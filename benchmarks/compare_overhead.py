"""Per-step cost of ``hyperbit compare`` against the same run trained by ``hyperbit train``.

Claim: ``compare`` adds no measurable overhead per training step; target: per-step time of a run
trained by compare / the same run trained by ``train()`` with the preset's own logging <= 1.02,
per arm (reported as pass/fail, never an error exit).

``hyperbit compare`` trains every run of its grid in-process with the ordinary
``hyperbit.train.train``; the only differences from ``hyperbit train`` are
``train.log_every=1`` (one metrics.jsonl line per step, for the report's spike counts) and the
token budget (here the same number of steps). Both sides, in one process, on the same data:

    train      ``train(cfg, run_dir)`` with ``cfg = resolve_run_config(preset, overrides +
               arm_overrides(arm))``: the preset's ``train.log_every``, as ``hyperbit train``.
    compare    exactly what ``hyperbit compare --arms ARM --seeds <the preset's seed>`` does:
               ``specs = plan(preset, overrides, [arm], [], [seed])``,
               ``prepare_shared_data(specs, out, log)``, ``run_grid(specs, out, log)``
               (a fresh grid directory every time, so nothing is skipped or resumed).

The model overrides come from ``hyperbit.reports.compare.grid.arm_overrides(arm)``, so both sides build the
same model; the script asserts that the two resolved configs differ only in ``train.log_every``.
Common overrides: ``train.steps=--steps``, ``train.warmup_steps=min(preset's, steps)`` (compare
clips it the same way) and ``data.path=<prepared dir>``; everything else (evaluation, checkpoint,
monitor cadence) is the preset's and the same on both sides.

Method
    * The data is prepared once beforehand (``hyperbit.data.prepare`` with the preset's corpus,
      tokenizer and ``data.max_bytes``) and passed as ``data.path=<dir>``: no run tokenises
      (``prepare_shared_data`` leaves a prepared directory alone).
    * Per-step time from each run's own metrics.jsonl: train records carry ``elapsed_s`` (seconds
      since the loop started) at their ``step``. Steady step = (elapsed at the last step -
      elapsed at step S) / (last - S), where S is the first multiple of the train side's
      ``log_every`` at or after step {skip} (start-up and the first steps' allocations excluded).
      Both sides log steps S and the last step, so both are timed over the very same steps.
    * Rounds: every round runs each (arm, side) once, in a fresh run directory; odd rounds run them
      in reverse order, so the order of the sides alternates and slow drift of a shared machine
      hits both alike. One untimed short run of each side and arm first. Reported per arm: the
      median over rounds of the per-round ratio compare / train, the median step ms of each side,
      and the median over rounds of the extra ms per step (compare - train).
    * Context: the cost of one metrics line, ``hyperbit.train.metrics.write_metrics`` (json.dumps +
      write + flush; plus TensorBoard scalars when tensorboard is installed, which it is not in
      the measurement unless ``settings.tensorboard`` says so) on a record taken from a compare
      run, timed over many repeats into a file next to the runs; times (1 - 1/log_every) it is
      the extra per step that the additional lines alone explain.
    * ``train()`` prints progress lines (``log=print``, as ``hyperbit train`` and ``run_grid`` do);
      stdout and stderr are redirected to a buffer while either side runs.

    python benchmarks/compare_overhead.py                     # full run (deep preset, minutes on CPU)
    python benchmarks/compare_overhead.py --quick             # tiny preset, smoke test
    python benchmarks/compare_overhead.py --arms dhc4 --rounds 9 --steps 100 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402

from hyperbit.reports.compare.grid import arm_overrides, plan, prepare_shared_data, run_grid  # noqa: E402
from hyperbit.config import ConfigError  # noqa: E402
from hyperbit.data import prepare  # noqa: E402
from hyperbit.models import build_model  # noqa: E402
from hyperbit.train import RunConfig, resolve_run_config  # noqa: E402
from hyperbit.train import train  # noqa: E402
from hyperbit.train.metrics import write_metrics  # noqa: E402
from train_throughput import log, resolve_device  # noqa: E402

TARGET_RATIO = 1.02
SIDES = ("train", "compare")
SKIP = 5  # the steady window starts at the first common logged step at or after this one
__doc__ = __doc__.replace("{skip}", str(SKIP))

FULL = dict(preset="deep", steps=60, rounds=5, line_repeats=20_000)
QUICK = dict(preset="tiny", steps=15, rounds=2, line_repeats=2_000)
DEFAULT_ARMS = "prenorm,dhc4"
DEFAULT_OUT = C.RESULTS_DIR / "compare_overhead.json"
DEFAULT_OUT_QUICK = C.RESULTS_DIR / "compare_overhead_quick.json"
LINE_BATCHES = 5


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None,
                    help=f"run preset (default {FULL['preset']}; {QUICK['preset']} with --quick)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps per run (default {FULL['steps']}; {QUICK['steps']} with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"timing rounds (default {FULL['rounds']}; {QUICK['rounds']} with --quick)")
    ap.add_argument("--arms", default=DEFAULT_ARMS,
                    help=f"comma list of compare arms (prenorm, postnorm, shcN, dhcN, ...; default {DEFAULT_ARMS})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default, as hyperbit train)")
    ap.add_argument("--quick", action="store_true",
                    help="the 'tiny' run preset (d 32, 2 blocks, batch 4 x seq 32), few steps, 2 rounds")
    ap.add_argument("--out", default=None,
                    help=f"JSON path (default {DEFAULT_OUT.relative_to(C.REPO_ROOT)}, "
                         f"or {DEFAULT_OUT_QUICK.relative_to(C.REPO_ROOT)} with --quick)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.preset = args.preset or base["preset"]
    args.steps = base["steps"] if args.steps is None else args.steps
    args.rounds = base["rounds"] if args.rounds is None else args.rounds
    args.line_repeats = base["line_repeats"]
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    args.arm_names = list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))
    if not args.arm_names:
        ap.error("--arms needs at least one arm")
    try:
        for arm in args.arm_names:
            arm_overrides(arm)
        preset_cfg = resolve_run_config(args.preset, [])
    except ConfigError as e:
        ap.error(str(e))
    args.log_every = max(1, preset_cfg.train.log_every)
    args.window_start = args.log_every * math.ceil(SKIP / args.log_every)
    if args.steps <= args.window_start:
        ap.error(f"--steps must exceed {args.window_start} (the first step both sides log at or after "
                 f"step {SKIP} with the preset's train.log_every={args.log_every}), got {args.steps}")
    return args


# --- configs ----------------------------------------------------------------------------------

def common_overrides(args, steps: int, data_dir: Path) -> list[str]:
    """Overrides both sides share (none of them a pathway key, which compare refuses)."""
    warmup = min(resolve_run_config(args.preset, []).train.warmup_steps, steps)
    return [f"train.steps={steps}", f"train.warmup_steps={warmup}", f"data.path={data_dir}"]


def seed_of(args) -> int:
    return resolve_run_config(args.preset, []).train.seed


def train_config(args, arm: str, steps: int, data_dir: Path) -> RunConfig:
    return resolve_run_config(args.preset, [*common_overrides(args, steps, data_dir), *arm_overrides(arm)])


def compare_specs(args, arm: str, steps: int, data_dir: Path):
    return plan(args.preset, common_overrides(args, steps, data_dir), [arm], [], [seed_of(args)])


def config_difference(a: dict, b: dict, prefix: str = "") -> dict[str, list]:
    """``{"section.key": [a's value, b's value]}`` for every key where two config dicts differ."""
    diff: dict[str, list] = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diff.update(config_difference(va, vb, f"{prefix}{key}."))
        elif va != vb:
            diff[f"{prefix}{key}"] = [va, vb]
    return diff


def check_configs(args, arm: str, data_dir: Path) -> dict[str, list]:
    """Assert both sides build the same model and differ only in ``train.log_every``."""
    cfg = train_config(args, arm, args.steps, data_dir)
    specs = compare_specs(args, arm, args.steps, data_dir)
    assert len(specs) == 1, specs
    other = specs[0].config
    assert cfg.model.to_dict() == other.model.to_dict(), (cfg.model.to_dict(), other.model.to_dict())
    diff = config_difference(cfg.to_dict(), other.to_dict())
    assert set(diff) <= {"train.log_every"}, f"{arm}: train and compare configs differ in {diff}"
    assert other.train.log_every == 1 and other.train.steps == cfg.train.steps == args.steps
    return diff


# --- the two sides ----------------------------------------------------------------------------

def _quiet(fn):
    """Run ``fn()`` with stdout and stderr going to a buffer (shown if it raises)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return fn()
    except BaseException:
        sys.stderr.write(captured.getvalue()[-4000:])
        raise


def read_train_records(metrics: Path) -> list[dict]:
    """The train records of a metrics.jsonl (evaluation and monitor records carry no ``elapsed_s``)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "elapsed_s" in r and "loss" in r]


def run_side(args, side: str, arm: str, steps: int, data_dir: Path, work: Path) -> dict:
    """One run of ``side`` in a fresh directory; wall time and the metrics.jsonl timings."""
    out = Path(tempfile.mkdtemp(prefix=f"{side}-{arm}-", dir=work))
    gc.collect()
    try:
        if side == "train":
            cfg = train_config(args, arm, steps, data_dir)
            run_dir = out / "run"

            def go():
                return train(cfg, run_dir, log=print)
        else:
            specs = compare_specs(args, arm, steps, data_dir)
            run_dir = out / "runs" / specs[0].name

            def go():
                prepare_shared_data(specs, out, print)
                statuses = run_grid(specs, out, print)
                if statuses[specs[0].name] != "finished":
                    raise RuntimeError(f"compare run {specs[0].name} ended {statuses[specs[0].name]}")
                assert specs[0].config.data.path == str(data_dir), "prepare_shared_data re-pointed data"

        t0 = time.perf_counter()
        _quiet(go)
        wall = time.perf_counter() - t0
        records = read_train_records(run_dir / "metrics.jsonl")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "elapsed": {int(r["step"]): float(r["elapsed_s"]) for r in records},
            "loss": records[-1]["loss"], "records": len(records), "record": records[-1]}


def steady_step_s(run: dict, start: int, end: int) -> float:
    e = run["elapsed"]
    if start not in e or end not in e:
        raise RuntimeError(f"metrics.jsonl lacks step {start} or {end}: logged {sorted(e)[:5]}...")
    return (e[end] - e[start]) / (end - start)


# --- the cost of one metrics line -------------------------------------------------------------

def metrics_line_cost(record: dict, path: Path, repeats: int, batches: int = LINE_BATCHES) -> dict:
    """Seconds per ``write_metrics(f, record)`` (json.dumps + write + flush), median of batches."""
    per_line = []
    with open(path, "a") as f:
        for _ in range(10):
            write_metrics(f, record)
        gc.collect()
        gc.disable()
        try:
            for _ in range(batches):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    write_metrics(f, record)
                per_line.append((time.perf_counter() - t0) / repeats)
        finally:
            gc.enable()
    return {"us": C.median(per_line) * 1e6, "us_per_batch": [x * 1e6 for x in per_line],
            "repeats": repeats, "batches": batches, "record_bytes": len(json.dumps(record)) + 1,
            "record": record}


# --- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    arms, steps, start = args.arm_names, args.steps, args.window_start
    probe = train_config(args, arms[0], steps, Path("."))
    device = resolve_device(probe)
    info = C.machine_info(str(device))
    tokens_per_step = probe.train.batch_size * probe.train.seq_len
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    warm_steps = min(steps, 2 * start)
    settings = {"quick": args.quick, "preset": args.preset, "rounds": args.rounds, "steps": steps,
                "arms": arms, "seed": seed_of(args), "device": str(device),
                "threads": torch.get_num_threads(), "threads_flag": args.threads,
                "batch_size": probe.train.batch_size, "seq_len": probe.train.seq_len,
                "tokens_per_step": tokens_per_step, "precision": C.precision(str(device)),
                "log_every": {"train": probe.train.log_every, "compare": 1},
                "eval_every": probe.train.eval_every, "save_every": probe.train.save_every,
                "monitor_every": probe.train.monitor_every, "eval_batches": probe.train.eval_batches,
                "window": {"from_step": start, "to_step": steps}, "warmup_run_steps": warm_steps,
                "tensorboard": tensorboard, "metrics_line_repeats": args.line_repeats,
                "target_ratio": TARGET_RATIO}
    log(f"compare_overhead: preset {args.preset}, arms {','.join(arms)}, {args.rounds} rounds, "
        f"{steps} steps (window {start}->{steps}), batch {probe.train.batch_size} x seq "
        f"{probe.train.seq_len}, log_every {probe.train.log_every} vs 1, {torch.get_num_threads()} threads, "
        f"{device}" + (" [quick]" if args.quick else ""))

    work = Path(tempfile.mkdtemp(prefix="hyperbit-compare-overhead-"))
    try:
        data_dir = (work / "data").resolve()
        d = resolve_run_config(args.preset, []).data  # the preset's corpus (probe's data.path is ".")
        t0 = time.perf_counter()
        meta = _quiet(lambda: prepare(d.path, data_dir, tokenizer=d.tokenizer,
                                      vocab_size=d.vocab_size if d.tokenizer == "bpe" else None,
                                      val_fraction=d.val_fraction, max_bytes=d.max_bytes or None,
                                      text_field=d.text_field))
        data_info = {"source": d.path, "tokenizer": d.tokenizer, "max_bytes": d.max_bytes,
                     "prepare_s": time.perf_counter() - t0, "tokens": meta["tokens"]}
        log(f"  data prepared in {data_info['prepare_s']:.1f}s: {data_info['tokens']}")

        diffs = {arm: check_configs(args, arm, data_dir) for arm in arms}

        log(f"  warm-up (one untimed {warm_steps}-step run of each side and arm)")
        for arm in arms:
            for side in SIDES:
                run_side(args, side, arm, warm_steps, data_dir, work)

        units = [(arm, side) for arm in arms for side in SIDES]
        raw: dict[tuple[str, str], list[dict]] = {u: [] for u in units}
        t0 = time.perf_counter()
        for r in range(args.rounds):
            for arm, side in (units if r % 2 == 0 else units[::-1]):
                raw[(arm, side)].append(run_side(args, side, arm, steps, data_dir, work))
            log(f"  round {r + 1}/{args.rounds} ({time.perf_counter() - t0:.0f}s)")

        log(f"  metrics line cost ({LINE_BATCHES} x {args.line_repeats} writes)")
        line = metrics_line_cost(raw[(arms[0], "compare")][-1]["record"], work / "line_cost.jsonl",
                                 args.line_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # --- assemble -----------------------------------------------------------------------------
    extra_lines_per_step = 1 - 1 / max(1, probe.train.log_every)
    results = {}
    for arm in arms:
        cfg = train_config(args, arm, steps, Path("."))
        entry: dict = {"overrides": arm_overrides(arm), "model_config": cfg.model.to_dict(),
                       "params": sum(x.numel() for x in build_model(cfg.model, device="meta").parameters()),
                       "config_difference": diffs[arm]}
        per_round = {}
        for side in SIDES:
            runs = raw[(arm, side)]
            step_s = [steady_step_s(x, start, steps) for x in runs]
            per_round[side] = step_s
            entry[side] = {
                "step_ms": C.median(step_s) * 1e3,
                "step_ms_per_round": [s * 1e3 for s in step_s],
                "step_ms_summary": C.summarize(s * 1e3 for s in step_s),
                "tokens_per_s": tokens_per_step / C.median(step_s),
                "wall_s": [x["wall_s"] for x in runs],
                "window_elapsed_s": [[x["elapsed"][start], x["elapsed"][steps]] for x in runs],
                "metrics_records": [x["records"] for x in runs],
                "final_loss": [x["loss"] for x in runs],
            }
        ratios = [c / t for t, c in zip(per_round["train"], per_round["compare"])]
        extra = [(c - t) * 1e3 for t, c in zip(per_round["train"], per_round["compare"])]
        entry["round_ratios"] = ratios
        entry["ratio"] = C.median(ratios)
        entry["ratio_of_medians"] = C.ratio(entry["compare"]["step_ms"], entry["train"]["step_ms"])
        entry["extra_ms_per_round"] = extra
        entry["extra_ms_per_step"] = C.median(extra)
        entry["logging_explains_ms_per_step"] = line["us"] * extra_lines_per_step / 1e3
        # the two sides train bit for bit the same run: their losses must agree
        entry["same_losses"] = entry["train"]["final_loss"] == entry["compare"]["final_loss"]
        results[arm] = entry

    targets = []
    for arm, e in results.items():
        value = e["ratio"]
        t = {"name": f"{arm}_step_ratio", "arm": arm,
             "description": f"compare step time <= {TARGET_RATIO}x train() step ({arm})",
             "ratio": value, "threshold": TARGET_RATIO,
             "passed": None if value is None or math.isnan(value) else bool(value <= TARGET_RATIO)}
        if args.quick:
            t["note"] = "quick mode: tiny model, not representative"
        targets.append(t)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["source_digest_end"] = C.source_digest()
    info["source_changed_during_run"] = info["source_digest_end"] != info["source_digest"]

    # --- report -------------------------------------------------------------------------------
    print(f"\ncompare overhead: preset {args.preset}, batch {probe.train.batch_size} x seq "
          f"{probe.train.seq_len}, {C.precision(str(device))}, {torch.get_num_threads()} threads, {device} "
          f"({info['cpu_model'] if device.type == 'cpu' else info.get('cuda_device')}); {args.rounds} rounds "
          f"of {steps} steps, steady step = (elapsed[{steps}] - elapsed[{start}]) / {steps - start} from "
          f"metrics.jsonl; train logs every {probe.train.log_every}, compare every 1"
          + ("  [QUICK]" if args.quick else ""))
    headers = ["arm", "train ms", "compare ms", "extra ms", "compare/train", "rounds min-max",
               "logging explains ms"]
    rows = []
    for arm, e in results.items():
        rows.append([arm, C.fmt(e["train"]["step_ms"], ".3f"), C.fmt(e["compare"]["step_ms"], ".3f"),
                     C.fmt(e["extra_ms_per_step"], "+.3f"), C.fmt(e["ratio"], ".4f"),
                     f"{C.fmt(min(e['round_ratios']), '.3f')}-{C.fmt(max(e['round_ratios']), '.3f')}",
                     C.fmt(e["logging_explains_ms_per_step"], ".4f")])
    print(C.format_table(headers, rows))
    print("train / compare ms: median over rounds of the steady step; extra ms: median over rounds of "
          "compare - train; compare/train: median over rounds of the per-round ratio; logging explains: "
          f"one metrics line x (1 - 1/{probe.train.log_every}) extra lines per step")
    print(f"one metrics line (json.dumps + write + flush of a {line['record_bytes']}-byte record"
          + (", + TensorBoard scalars" if tensorboard else "") + f"): {C.fmt(line['us'], '.2f')} us "
          f"(median of {line['batches']} x {line['repeats']})")
    for arm, e in results.items():
        if not e["same_losses"]:
            msg = f"WARNING: {arm}: the train and compare runs ended on different losses (not the same run?)"
            print(msg)
            info.setdefault("warnings", []).append(msg)
    out_path = Path(args.out) if args.out else (DEFAULT_OUT_QUICK if args.quick else DEFAULT_OUT)
    C.finish("compare_overhead", info, targets, out_path, quick=args.quick,
             source_changed=info["source_changed_during_run"], settings=settings, data=data_info,
             metrics_line=line, arms=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

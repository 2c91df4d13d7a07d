"""The grid behind ``hyperbit compare``: arms x override axes x seeds, one token budget, resumable.

Every run of the grid is an ordinary ``hyperbit train`` run directory under ``OUT/runs/``, so each
can be evaluated, inspected or sampled on its own. Re-running the same command skips finished
runs, resumes unfinished ones from their last checkpoint (bit for bit, like ``train --resume``)
and refuses a run directory whose saved config differs from the one the grid asks for. Runs are
ordered seed by seed, so an interrupted grid already holds complete seeds for every arm.

A run stopped by a non-finite loss is a result, not an error: it is marked ``stopped.json`` in its
directory, reported as diverged, and not retried (resuming it would replay the same steps).
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..._io import atomic_write_text
from ...config import ConfigError
from ...data import prepare_data
from ...train import RunConfig, TrainingStopped, latest_checkpoint, resolve_run_config, step_of, train
from ...train.config import RUN_CONFIG_FILE
from .analysis import STOPPED, load_run
from .report import write_report

DEFAULT_ARMS = ("prenorm", "postnorm", "shc4", "dhc2", "dhc4")
#: a run whose whole number of steps misses the token budget by more than this fraction is noted
ROUNDING_NOTE = 0.01
# model keys an arm sets; a common override may not set them too (the arm would silently win)
ARM_KEYS = ("model.pathway", "model.expansion_rate", "model.hc_dynamic", "model.frac_rate")


@dataclass
class RunSpec:
    name: str  # directory name under OUT/runs
    arm: str  # label shared by the seeds of one configuration
    seed: int
    config: RunConfig


def arm_overrides(arm: str) -> list[str]:
    """``prenorm``, ``postnorm``, ``shcN`` / ``dhcN`` (static / dynamic HC with n streams),
    ``mhcN`` / ``mhcN-paper`` (manifold-constrained HC with n streams, the residual / the paper's
    init), ``fracM`` / ``sfracM`` (dynamic / static
    frac-connections with m fractions), ``sequential`` or ``parallelN`` as model overrides."""
    if m := re.fullmatch(r"(s?)frac([1-9][0-9]*)", arm):
        return ["model.pathway=frac", "model.expansion_rate=1", f"model.hc_dynamic={not m[1]}",
                f"model.frac_rate={int(m[2])}"]
    if m := re.fullmatch(r"mhc([1-9][0-9]*)-paper", arm):
        return [*arm_overrides(f"mhc{m[1]}"), "model.mhc_init=paper"]
    fixed = {"prenorm": ("prenorm", 1, True), "postnorm": ("postnorm", 1, True),
             "sequential": ("sequential", 2, True)}
    if arm in fixed:
        pathway, n, dynamic = fixed[arm]
    elif m := re.fullmatch(r"(shc|dhc|mhc|parallel)([1-9][0-9]*)", arm):
        pathway = {"parallel": "parallel", "mhc": "mhc"}.get(m[1], "hc")
        n, dynamic = int(m[2]), m[1] != "shc"
    else:
        raise ConfigError(f"unknown arm {arm!r}; use prenorm, postnorm, shcN, dhcN (static / dynamic "
                          "hyper-connections with N streams), mhcN, mhcN-paper, fracM / sfracM (dynamic / static "
                          "frac-connections with M fractions), sequential or parallelN")
    return [f"model.pathway={pathway}", f"model.expansion_rate={n}", f"model.hc_dynamic={dynamic}"]


def parse_seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` is a list, and ``2,`` the single seed 2."""
    try:
        seeds = ([int(s) for s in text.split(",") if s.strip()] if "," in text
                 else list(range(int(text))))
    except ValueError:
        raise ConfigError(f"--seeds must be a count (3) or a list (0,5,7; one seed: 2,), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds needs at least one seed, all distinct and >= 0; got {text!r}")
    return seeds


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``section.key=v1,v2,...``: one override axis of the grid."""
    key, eq, values = text.partition("=")
    options = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or "." not in key or not options:
        raise ConfigError(f"--axis must look like section.key=v1,v2 (e.g. train.lr=1e-3,3e-3), got {text!r}")
    if key.strip() in ARM_KEYS or key.strip() == "train.seed":
        raise ConfigError(f"--axis {key.strip()} is set by --arms / --seeds; use those instead")
    return key.strip(), options


def plan(preset: str | None, overrides: list[str], arms: list[str], axes: list[tuple[str, list[str]]],
         seeds: list[int], tokens: int | None = None,
         log: Callable[[str], None] | None = None) -> list[RunSpec]:
    """Every run of the grid, validated up front (a bad value fails before anything trains).

    All runs see the same number of training tokens: ``tokens`` or, by default, the base config's
    ``train.steps x batch_size x seq_len``; each run's step count is that budget over its own
    tokens per step (an axis may change the batch or the sequence length), rounded to the nearest
    step. A budget below one step of some run is a ConfigError naming the smallest budget that
    gives every run a step; a run whose rounded budget is more than :data:`ROUNDING_NOTE` off is
    noted in ``log``. Runs log every step (the report's spike counts need every loss)."""
    for pair in overrides:
        key = pair.partition("=")[0].strip()
        if key in ARM_KEYS:
            raise ConfigError(f"override {pair!r} conflicts with --arms, which sets the pathway; "
                              "choose pathways with --arms")
        if key in ("train.seed", "train.log_every"):
            raise ConfigError(f"override {pair!r}: compare sets {key} itself (seeds come from --seeds; "
                              "every step is logged for the spike counts)")
    if len(set(arms)) != len(arms) or not arms:
        raise ConfigError(f"--arms must name at least one arm, each once; got {arms}")
    base = resolve_run_config(preset, overrides)
    budget = tokens or base.train.steps * base.train.batch_size * base.train.seq_len
    specs = []
    for seed in seeds:
        for arm in arms:
            for values in itertools.product(*(options for _, options in axes)):
                extra = [f"{key}={value}" for (key, _), value in zip(axes, values)]
                label = ",".join([arm, *extra])
                cfg = resolve_run_config(preset, [*overrides, *arm_overrides(arm), *extra,
                                                  f"train.seed={seed}", "train.log_every=1"])
                t = cfg.train
                t.steps = max(1, round(budget / (t.batch_size * t.seq_len)))
                t.warmup_steps = min(t.warmup_steps, t.steps)
                cfg = RunConfig.from_dict(cfg.to_dict())  # re-validated with the budget's steps
                specs.append(RunSpec(_dir_name(label, seed), label, seed, cfg))
    _check_budget(specs, budget, tokens is not None, log)
    return specs


def _check_budget(specs: list[RunSpec], budget: int, given: bool, log: Callable[[str], None] | None) -> None:
    """Refuse a budget below one step of some run (it would silently train one step); note a run
    whose whole number of steps misses the budget by more than ROUNDING_NOTE."""
    def per_step(spec: RunSpec) -> int:
        return spec.config.train.batch_size * spec.config.train.seq_len

    largest = max(specs, key=per_step)
    if budget < per_step(largest):
        t = largest.config.train
        source = "--tokens" if given else "the preset's steps x batch_size x seq_len"
        raise ConfigError(f"token budget {budget:,} ({source}) is less than one training step of "
                          f"{largest.arm} ({t.batch_size} x {t.seq_len} = {per_step(largest):,} tokens); "
                          f"use --tokens {per_step(largest)} or more")
    noted = set()
    for spec in specs:
        t = spec.config.train
        actual = t.steps * per_step(spec)
        if log is not None and abs(actual - budget) > ROUNDING_NOTE * budget and spec.arm not in noted:
            noted.add(spec.arm)
            log(f"note: {spec.arm} trains {t.steps:,} steps x {t.batch_size} x {t.seq_len} = {actual:,} "
                f"tokens, {(actual - budget) / budget:+.1%} off the budget of {budget:,} (whole steps only)")


def _dir_name(label: str, seed: int) -> str:
    return f"{_safe_name(label)}-s{seed}"


def _safe_name(label: str) -> str:
    """A file name for an arm label or axis combination (``dhc4,train.lr=1e-3`` ->
    ``dhc4_train.lr=1e-3``)."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", label).replace(",", "_")


def run_status(run_dir: Path, steps: int) -> str:
    """``new``, ``partial`` (resumable), ``finished`` or ``diverged``."""
    if (run_dir / STOPPED).exists():
        return "diverged"
    if not (run_dir / RUN_CONFIG_FILE).exists():
        return "new"
    latest = latest_checkpoint(run_dir)
    done = step_of(latest.name) if latest is not None else 0
    return "finished" if done >= steps else "partial"


def prepare_shared_data(specs: list[RunSpec], out: Path, log: Callable[[str], None]) -> None:
    """Tokenise each distinct corpus once into ``OUT/data/<hash>`` and point the runs at it (runs
    would otherwise each tokenise the same corpus into their own directory)."""
    corpora: dict[str, Path] = {}
    for spec in specs:
        data = spec.config.data
        if spec.config.model.arch != "lm":
            continue  # images (a vision transformer) are read as they are: nothing to tokenise
        if Path(data.path).is_dir() and (Path(data.path) / "meta.json").exists():
            continue  # already prepared by the user
        key = json.dumps(vars(data), sort_keys=True)
        if key not in corpora:
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]  # the same corpus, the same dir
            corpora[key] = (out / "data" / digest).resolve()
            prepare_data(data, corpora[key], log)
        data.path = str(corpora[key])


def run_grid(specs: list[RunSpec], out: Path, log: Callable[[str], None] = print) -> dict[str, str]:
    """Train every run that is not finished; returns each run's final status by name."""
    statuses = {s.name: run_status(out / "runs" / s.name, s.config.train.steps) for s in specs}
    todo = [s for s in specs if statuses[s.name] in ("new", "partial")]
    skipped = len(specs) - len(todo)
    log(f"compare: {len(specs)} runs, {len(todo)} to train"
        + (f" ({skipped} finished or diverged, skipped)" if skipped else ""))
    t0 = time.perf_counter()
    for i, spec in enumerate(todo, 1):
        run_dir = out / "runs" / spec.name
        resume = statuses[spec.name] == "partial"
        eta = ""
        if i > 1:
            per_run = (time.perf_counter() - t0) / (i - 1)
            eta = f", about {math.ceil(per_run * (len(todo) - i + 1) / 60)} min left"
        log(f"[{i}/{len(todo)}] {spec.name}: {'resuming' if resume else 'training'} "
            f"{spec.config.train.steps} steps{eta}")
        try:
            train(spec.config, run_dir, resume=resume)
            statuses[spec.name] = "finished"
        except TrainingStopped as e:
            (run_dir / STOPPED).write_text(json.dumps({"reason": str(e)}) + "\n")
            statuses[spec.name] = "diverged"
            log(f"{spec.name}: diverged ({e})")
        gc.collect()
    return statuses


def compare(preset: str | None, overrides: list[str], arms: list[str], axes: list[tuple[str, list[str]]],
            seeds: list[int], *, tokens: int | None = None, out: str | Path | None = None,
            baseline: str | None = None, report_only: bool = False, dry_run: bool = False,
            command: str | None = None, log: Callable[[str], None] = print) -> Path | None:
    """``hyperbit compare``: plan the grid, train what is not finished (unless ``report_only``)
    and write ``OUT/report/``; returns the path of report.md (None for ``dry_run``).
    ``baseline`` is an arm name (default: the first arm). With override axes, ``OUT/report/``
    measures every run against the baseline arm's first axis combination, and
    ``OUT/report/<combination>/`` holds one report per combination, measured against the baseline
    arm at the same axis values."""
    specs = plan(preset, overrides, arms, axes, seeds, tokens, log)
    baseline = baseline or arms[0]
    if baseline not in arms:
        raise ConfigError(f"--baseline {baseline!r} is not one of the arms {arms}")
    baseline_label = next(s.arm for s in specs if s.arm.split(",")[0] == baseline)
    out = Path(out or f"runs/compare-{preset or 'default'}")
    if out.exists() and any(out.iterdir()) and not (out / "compare.json").exists():
        raise ConfigError(f"{out} exists and is not a hyperbit compare directory; choose another --out")
    if report_only:  # reads the run directories only: nothing to prepare, nothing to write first
        statuses = {s.name: run_status(out / "runs" / s.name, s.config.train.steps) for s in specs}
        if all(status == "new" for status in statuses.values()):
            raise ConfigError(f"no runs in {out} to report on yet; run without --report-only")
    if dry_run:
        for s in specs:
            t = s.config.train
            log(f"{s.name}: {t.steps} steps x {t.batch_size} x {t.seq_len} tokens")
        return None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps({"command": command, "baseline": baseline_label,
                                                        "runs": [s.name for s in specs]}, indent=2) + "\n")
    if not report_only:
        prepare_shared_data(specs, out, log)
        statuses = run_grid(specs, out, log)
    records = [load_run(out / "runs" / s.name, s.name, s.arm, s.seed) for s in specs
               if statuses[s.name] != "new"]
    write_report(records, out / "report", baseline=baseline_label, command=command)
    combos = list(dict.fromkeys(_combo(s.arm) for s in specs))
    if len(combos) > 1:  # each axis combination also against the baseline arm at the same values
        for combo in combos:
            members = [r for r in records if _combo(r.arm) == combo]
            if members:
                path = out / "report" / _safe_name(combo)
                write_report(members, path, baseline=f"{baseline},{combo}", command=command,
                             title=f"hyperbit compare: {combo}")
                log(f"report for {combo}: {path / 'report.md'}")
    return out / "report" / "report.md"


def _combo(label: str) -> str:
    """The axis part of an arm label (``dhc4,train.lr=1e-3`` -> ``train.lr=1e-3``)."""
    return label.partition(",")[2]


__all__ = ["DEFAULT_ARMS", "ROUNDING_NOTE", "compare", "RunSpec", "arm_overrides", "parse_axis",
           "parse_seeds", "plan", "prepare_shared_data", "run_grid", "run_status"]

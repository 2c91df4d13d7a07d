"""The training loop behind ``hyperbit train``: data -> model -> AdamW -> checkpoints, resumable.

A run directory holds ``config.json`` (the resolved :class:`RunConfig`), ``metrics.jsonl`` (one
JSON object per logged step and per evaluation), ``data/`` (token shards prepared once, unless the
config points at a prepared directory) and ``checkpoints/``. Every source of randomness in a step
is a function of the step number (batches are addressed by position, the schedule by step), and
checkpoints carry the optimizer and RNG states, so a resumed run reproduces the uninterrupted one
bit for bit.
"""

from __future__ import annotations

import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .._io import atomic_write_text
from ..analysis import check_wiring, pathway_summary
from ..config import ConfigError
from ..data import DataError, TokenShards, prepare_data
from ..models import build_model
from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import METRICS_FILE, RUN_CONFIG_FILE, RunConfig
from .errors import TrainingStopped
from .evaluate import evaluate
from .metrics import Progress, open_tensorboard, truncate_metrics, write_metrics
from .optim import param_groups
from .rng import restore_rng_state
from .schedule import apply_schedule


def prepare_run_dir(out: Path, cfg: RunConfig | None, resume: bool, overwrite: bool) -> RunConfig:
    """Create, resume or replace the run directory; never touches a directory that is not ours.
    With ``resume`` and ``cfg=None`` the run's saved config is used; a given ``cfg`` must match it."""
    config_file = out / RUN_CONFIG_FILE
    if cfg is None and not (resume and config_file.exists()):
        raise ConfigError(f"nothing to resume in {out}: no config.json there")
    if out.exists() and any(out.iterdir()):
        if resume:
            if not config_file.exists():
                raise ConfigError(f"{out} has no config.json: not a hyperbit run directory to resume")
            saved = RunConfig.load(config_file)
            if cfg is not None and saved.to_dict() != cfg.to_dict():
                diff = _first_difference(saved.to_dict(), cfg.to_dict())
                raise ConfigError(f"--resume with a different config than {config_file} ({diff}); "
                                  "resume with the same settings or train into a new --out")
            return saved
        if not overwrite:
            raise ConfigError(f"run directory {out} already exists; pass --resume to continue it or "
                              "--overwrite to replace it")
        if not config_file.exists():
            raise ConfigError(f"refusing to overwrite {out}: it is not a hyperbit run directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, cfg.to_json() + "\n")
    return cfg


def load_data(cfg: RunConfig, out: Path, log: Callable[[str], None]) -> tuple[TokenShards, TokenShards]:
    """Token shards for the run: a prepared directory, or the corpus tokenised once into out/data."""
    data_dir = cfg.prepared_data_dir(out)
    prepare_data(cfg.data, data_dir, log)
    train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    train.check_vocab(cfg.model.vocab_size)
    return train, val


def train(cfg: RunConfig | None, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print) -> dict:
    """Train per ``cfg`` into ``out``; returns the final metrics. Raises ConfigError, DataError or
    CheckpointError (one-line messages) on bad input, TrainingStopped on a non-finite loss.
    Under ``torchrun`` it runs data-parallel (``train.distributed``: ddp or fsdp2)."""
    out = Path(out)
    kind = distributed.pick_device(cfg.train.device if cfg is not None else None).type
    info = distributed.setup(kind)
    try:
        return _train(cfg, out, resume, overwrite, log if info.is_main else (lambda _: None), info,
                      kind)
    finally:
        distributed.teardown(info)


def _train(cfg, out: Path, resume: bool, overwrite: bool, log, info: distributed.DistInfo,
           kind: str) -> dict:
    if info.is_main:
        cfg = prepare_run_dir(out, cfg, resume, overwrite)
    distributed.barrier(info)
    if not info.is_main:
        cfg = RunConfig.load(out / RUN_CONFIG_FILE)
    t = cfg.train
    if info.is_main:
        train_data, val_data = load_data(cfg, out, log)
    distributed.barrier(info)
    if not info.is_main:
        train_data, val_data = load_data(cfg, out, log)
    micro = t.batch_size // t.grad_accum  # sequences per micro-batch, over all ranks
    if micro % info.world_size:
        raise ConfigError(f"train.batch_size / train.grad_accum = {micro} must be divisible by the "
                          f"{info.world_size} processes")
    per_rank = micro // info.world_size
    device = torch.device(f"cuda:{info.local_rank}" if kind == "cuda" else "cpu")
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    resume_from = latest_checkpoint(out) if resume else None
    if t.check_wiring and info.is_main and resume_from is None:
        report = check_wiring(model)
        log(f"wiring check: {'PASS' if report.ok else 'FAIL'} ({cfg.model.pathway}, "
            f"n={cfg.model.expansion_rate}, {cfg.model.linear})")
        if not report.ok:
            raise ConfigError(f"the model fails the wiring check: {report.problems[0]}")
    start, ckpt = 0, None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model, None, map_location=device)
        start = ckpt["step"]
    sharded = t.distributed == "fsdp2" and info.enabled
    runner = distributed.wrap(model, t.distributed, info, device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), fused=device.type == "cuda" or None)
    if ckpt is not None:
        load_checkpoint(ckpt["path"], None, _sharded().ShardedOptimizerLoader(model, optimizer) if sharded
                        else optimizer, map_location=device)
        restore_rng_state(ckpt)
        log(f"resumed from {ckpt['path']} at step {start}")
        if start >= t.steps:
            log(f"run already complete at step {start} of {t.steps}")
            return {}
    if info.is_main:  # metrics logged after the checkpoint (or, with none, at all) are logged again
        truncate_metrics(out / METRICS_FILE, start)
    if t.compile:
        runner = torch.compile(runner)
    schedule = t.schedule_obj()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                else nullcontext())
    tokens_per_step = t.batch_size * t.seq_len
    metrics_file = (out / METRICS_FILE).open("a") if info.is_main else None
    board = open_tensorboard(out) if info.is_main else None
    progress = Progress(t.steps, start, tokens_per_step, log, enabled=info.is_main)
    monitor_idx = _monitor_batch(val_data, t.seq_len).to(device) if t.monitor_every else None
    last = {}
    try:
        for step in range(start, t.steps):
            lr = apply_schedule(optimizer, schedule, step)
            total = torch.zeros((), device=device)
            # the step's global batch, whatever the accumulation and the number of processes:
            # micro-batch m is rows [m * micro, (m+1) * micro), split evenly over the ranks
            xs, ys = train_data.get_batch(step, t.batch_size, t.seq_len, seed=t.seed)
            for m in range(t.grad_accum):
                rows = slice(m * micro + info.rank * per_rank, m * micro + (info.rank + 1) * per_rank)
                with autocast:
                    loss = runner(xs[rows].to(device), ys[rows].to(device))[1] / t.grad_accum
                loss.backward()
                total += loss.detach()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip) if t.clip > 0
                         else torch.zeros((), device=device))
            loss_value = float(distributed.mean_over_ranks(total, info))
            grad_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(loss_value) or not math.isfinite(grad_value):
                kept = latest_checkpoint(out)
                raise TrainingStopped(f"non-finite loss ({loss_value}) or gradient norm at step {step + 1}; "
                                      f"stopped, last good checkpoint: {kept or 'none'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if info.is_main and (done % max(1, t.log_every) == 0 or done == t.steps):
                last = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                        "tokens": done * tokens_per_step, **progress.rates(done)}
                write_metrics(metrics_file, last, board)
            progress.update(done, loss_value)
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                if info.is_main or sharded:  # a sharded model needs every rank in its forward
                    evaluation = evaluate(model, val_data, t.seq_len, micro, t.eval_batches, device, autocast)
                    if info.is_main:
                        write_metrics(metrics_file, {"step": done, **evaluation}, board)
                        progress.note(f"step {done}: val loss {evaluation['val_loss']:.4f}, "
                                      f"{evaluation['val_bpb']:.4f} bits/byte")
                        last.update(evaluation)
                distributed.barrier(info)
            if monitor_idx is not None and (done % t.monitor_every == 0 or done == t.steps):
                if info.is_main or sharded:
                    with autocast:
                        summary = pathway_summary(model, monitor_idx)
                    if info.is_main:
                        write_metrics(metrics_file, {"step": done, "monitor": summary}, board)
            if (t.save_every and done % t.save_every == 0) or done == t.steps:
                # FSDP2: every rank joins gathering the full state; rank 0 writes it
                model_state, optim_state = (_sharded().gather_full_state(model, optimizer) if sharded
                                            else (model, optimizer))
                if info.is_main:
                    save_checkpoint(out, done, model_state, optim_state, cfg.to_dict(),
                                    {"position": done}, keep_last=t.keep_last)
                distributed.barrier(info)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if board is not None:
            board.close()
        progress.close()
    return last


def _sharded():
    """FSDP2 state helpers, imported only by sharded runs: ``torch.distributed.checkpoint`` costs
    most of a second to import, which every other command would pay through ``TrainingStopped``."""
    from . import sharded_state

    return sharded_state


def _monitor_batch(data: TokenShards, seq_len: int) -> torch.Tensor:
    """The fixed batch the training monitors read: the first two validation windows (enough
    tokens for the collapse quantiles, a fraction of a training step to run)."""
    first = next(data.iter_eval_batches(2, seq_len, max_batches=1), None)
    if first is None:
        raise DataError("the validation split is too small for one evaluation window")
    return first[0]


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}: saved {va!r}, given {vb!r}"
    return ""


__all__ = ["TrainingStopped", "load_data", "prepare_run_dir", "train"]

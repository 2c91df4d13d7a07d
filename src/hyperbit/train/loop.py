"""The training loop behind ``hyperbit train``: data -> model -> AdamW -> checkpoints, resumable.

A run directory holds ``config.json`` (the resolved :class:`RunConfig`), ``metrics.jsonl`` (one
JSON object per logged step and per evaluation), ``data/`` (token shards prepared once, unless the
config points at a prepared directory) and ``checkpoints/``. Every source of randomness in a step
is a function of the step number (batches are addressed by position, the schedule by step), and
checkpoints carry the optimizer and RNG states, so a resumed run reproduces the uninterrupted one
bit for bit.

The directory is locked while a process trains in it (:mod:`hyperbit.train.rundir`); Ctrl-C and
SIGTERM finish the current step and save a checkpoint (:mod:`hyperbit.train.interrupt`); a new run
that fails or is stopped before its first step leaves no directory behind.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path
from typing import Callable

import torch

from ..analysis import check_wiring, pathway_summary
from ..analysis.monitor import MONITOR_WINDOWS
from ..config import ConfigError
from ..data import DataError, TokenShards, prepare_data, read_meta
from ..models import build_model
from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import METRICS_FILE, RUN_CONFIG_FILE, RunConfig
from .errors import TrainingInterrupted, TrainingStopped
from .evaluate import evaluate
from .interrupt import StopRequests
from .metrics import Progress, open_tensorboard, truncate_metrics, write_metrics
from .optim import param_groups
from .precision import autocast as autocast_for
from .precision import describe, grad_scaler, resolve_precision
from .rng import restore_rng_state
from .rundir import open_run, remove_unstarted
from .schedule import apply_schedule


def load_data(cfg: RunConfig, out: Path, log: Callable[[str], None]) -> tuple[TokenShards, TokenShards | None]:
    """Token shards for the run: a prepared directory, or the corpus tokenised once into out/data.
    The validation split is None when the prepared directory has none (``--val-fraction 0``):
    the run then trains without evaluations and monitors, and says so."""
    data_dir = cfg.prepared_data_dir(out)
    prepare_data(cfg.data, data_dir, log)
    train = TokenShards(data_dir, "train")
    train.check_vocab(cfg.model.vocab_size)
    if not read_meta(data_dir)["tokens"].get("val"):
        log(f"{data_dir} has no validation split: training without evaluations or monitors")
        return train, None
    return train, TokenShards(data_dir, "val")


def train(cfg: RunConfig | None, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print) -> dict:
    """Train per ``cfg`` into ``out``; returns the final metrics. Raises ConfigError, DataError or
    CheckpointError (one-line messages) on bad input, TrainingStopped on a non-finite loss and
    TrainingInterrupted on SIGINT / SIGTERM (after saving a checkpoint).
    Under ``torchrun`` it runs data-parallel (``train.distributed``: ddp or fsdp2)."""
    out = Path(out)
    device = distributed.pick_device(cfg.train.device if cfg is not None else None)
    info = distributed.setup(device.type)
    if device.type == "cuda":
        device = torch.device(f"cuda:{info.local_rank}")
    auto = cfg is not None and cfg.train.precision == "auto" and not resume
    if auto:  # a new run stores the precision it resolved to
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, precision=resolve_precision("auto", device)))
    try:
        with StopRequests() as stops:
            return _train(cfg, out, resume, overwrite, log if info.is_main else (lambda _: None), info,
                          device, stops, auto)
    finally:
        distributed.teardown(info)


def _train(cfg, out: Path, resume: bool, overwrite: bool, log, info: distributed.DistInfo,
           device: torch.device, stops: StopRequests, auto: bool) -> dict:
    lock, new, loop = None, False, None
    if info.is_main:
        cfg, lock, new = open_run(out, cfg, resume, overwrite)
    try:
        distributed.barrier(info)
        if not info.is_main:
            cfg = RunConfig.load(out / RUN_CONFIG_FILE)
        loop = _Loop(cfg, out, resume, log, info, device)
        log(describe("auto" if auto else cfg.train.precision, device))
        stops.arm()
        return loop.run(stops)
    except BaseException:
        if info.is_main and new and (loop is None or loop.completed == 0):
            remove_unstarted(out, lock)  # a new run that never completed a step leaves nothing
        raise
    finally:
        if lock is not None:
            lock.release()


class _Loop:
    """Everything one training process sets up before the first step, and the steps."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool, log, info: distributed.DistInfo,
                 device: torch.device):
        self.cfg, self.out, self.log, self.info, self.device = cfg, out, log, info, device
        t = cfg.train
        if info.is_main:
            self.train_data, self.val_data = load_data(cfg, out, log)
        distributed.barrier(info)
        if not info.is_main:
            self.train_data, self.val_data = load_data(cfg, out, log)
        self.micro = t.batch_size // t.grad_accum  # sequences per micro-batch, over all ranks
        if self.micro % info.world_size:
            raise ConfigError(f"train.batch_size / train.grad_accum = {self.micro} must be divisible by "
                              f"the {info.world_size} processes")
        self.per_rank = self.micro // info.world_size
        torch.manual_seed(t.seed)
        self.model = model = build_model(cfg.model).to(device)
        resume_from = latest_checkpoint(out) if resume else None
        if resume and resume_from is None:
            log(f"nothing to resume in {out}: no checkpoint yet; training from step 0")
        if t.check_wiring and info.is_main and resume_from is None:
            report = check_wiring(model)
            log(f"wiring check: {'PASS' if report.ok else 'FAIL'} ({cfg.model.pathway}, "
                f"n={cfg.model.expansion_rate}, {cfg.model.linear})")
            if not report.ok:
                raise ConfigError(f"the model fails the wiring check: {report.problems[0]}")
        # the weights load into the unsharded model; the optimizer state once it exists
        ckpt = load_checkpoint(resume_from, model, None, map_location=device) if resume_from else None
        self.sharded = t.distributed == "fsdp2" and info.enabled
        self.runner = distributed.wrap(model, t.distributed, info, device)
        self.optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                           betas=(t.beta1, t.beta2), fused=device.type == "cuda" or None)
        self.scaler = grad_scaler(t.precision, device)
        self.autocast = autocast_for(t.precision, device)
        self.start = self.completed = 0  # completed: steps this process has finished
        if ckpt is not None:
            self._resume(ckpt)
        if t.compile:
            self.runner = torch.compile(self.runner)

    def _resume(self, ckpt: dict) -> None:
        optimizer = (_sharded().ShardedOptimizerLoader(self.model, self.optimizer) if self.sharded
                     else self.optimizer)
        load_checkpoint(ckpt["path"], None, optimizer, map_location=self.device)
        restore_rng_state(ckpt)
        if self.scaler.is_enabled() and "grad_scaler" in ckpt["state"]:
            self.scaler.load_state_dict(ckpt["state"]["grad_scaler"])
        self.start = ckpt["step"]
        self.log(f"resumed from {ckpt['path']} at step {self.start}")

    def run(self, stops: StopRequests) -> dict:
        t, info, out = self.cfg.train, self.info, self.out
        if self.start >= t.steps:
            self.log(f"run already complete at step {self.start} of {t.steps}")
            return {}
        if info.is_main:  # metrics logged after the checkpoint (or, with none, at all) are logged again
            truncate_metrics(out / METRICS_FILE, self.start)
        schedule = t.schedule_obj()
        tokens_per_step = t.batch_size * t.seq_len
        metrics_file = (out / METRICS_FILE).open("a") if info.is_main else None
        board = open_tensorboard(out) if info.is_main else None
        progress = Progress(t.steps, self.start, tokens_per_step, self.log, enabled=info.is_main)
        monitor_idx = (_monitor_batch(self.val_data, t.seq_len).to(self.device)
                       if t.monitor_every and self.val_data is not None else None)
        last: dict = {}

        def record(entry: dict) -> None:
            write_metrics(metrics_file, entry, board)

        try:
            for step in range(self.start, t.steps):
                lr = apply_schedule(self.optimizer, schedule, step)
                loss_value, grad_value = self._step(step)
                done = step + 1
                self.completed += 1
                if info.is_main and (done % max(1, t.log_every) == 0 or done == t.steps):
                    last = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                            "tokens": done * tokens_per_step, **progress.rates(done)}
                    record(last)
                progress.update(done, loss_value)
                if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                    evaluation = self._evaluate()
                    if evaluation is not None:
                        record({"step": done, **evaluation})
                        progress.note(f"step {done}: val loss {evaluation['val_loss']:.4f}, "
                                      f"{evaluation['val_bpb']:.4f} bits/byte")
                        last.update(evaluation)
                if monitor_idx is not None and (done % t.monitor_every == 0 or done == t.steps):
                    if info.is_main or self.sharded:
                        with self.autocast:
                            summary = pathway_summary(self.model, monitor_idx)
                        if info.is_main:
                            record({"step": done, "monitor": summary})
                stop = distributed.any_rank(stops.requested, info) and done < t.steps
                if (t.save_every and done % t.save_every == 0) or done == t.steps or stop:
                    saved = self._save(done)
                if stop:
                    raise TrainingInterrupted(stops.signum or signal.SIGTERM, saved, done)
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if board is not None:
                board.close()
            progress.close()
        return last

    def _step(self, step: int) -> tuple[float, float]:
        """One optimizer step on the step's global batch; returns the loss and gradient norm."""
        t, info, device = self.cfg.train, self.info, self.device
        total = torch.zeros((), device=device)
        # the step's global batch, whatever the accumulation and the number of processes:
        # micro-batch m is rows [m * micro, (m+1) * micro), split evenly over the ranks
        xs, ys = self.train_data.get_batch(step, t.batch_size, t.seq_len, seed=t.seed)
        for m in range(t.grad_accum):
            rows = slice(m * self.micro + info.rank * self.per_rank,
                         m * self.micro + (info.rank + 1) * self.per_rank)
            with self.autocast:
                loss = self.runner(xs[rows].to(device), ys[rows].to(device))[1] / t.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip) if t.clip > 0
                     else torch.zeros((), device=device))
        loss_value = float(distributed.mean_over_ranks(total, info))
        grad_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        # fp16: an overflowing gradient is the scaler's business (it skips the step, lowers the scale)
        grad_bad = not math.isfinite(grad_value) and not self.scaler.is_enabled()
        if not math.isfinite(loss_value) or grad_bad:
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            kept = latest_checkpoint(self.out)
            raise TrainingStopped(f"non-finite {what} at step {step + 1} (loss {loss_value:.6g}, gradient "
                                  f"norm {grad_value:.6g}); last good checkpoint: {kept or 'none'}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_value

    def _evaluate(self) -> dict | None:
        """The validation loss (on rank 0; a sharded model needs every rank in its forward)."""
        evaluation = None
        if self.val_data is None:
            return None
        if self.info.is_main or self.sharded:
            t = self.cfg.train
            evaluation = evaluate(self.model, self.val_data, t.seq_len, self.micro, t.eval_batches,
                                  self.device, self.autocast)
        distributed.barrier(self.info)
        return evaluation if self.info.is_main else None

    def _save(self, done: int) -> Path | None:
        # FSDP2: every rank joins gathering the full state; rank 0 writes it
        model_state, optim_state = (_sharded().gather_full_state(self.model, self.optimizer)
                                    if self.sharded else (self.model, self.optimizer))
        path = None
        if self.info.is_main:
            state = {"position": done}
            if self.scaler.is_enabled():
                state["grad_scaler"] = self.scaler.state_dict()
            path = save_checkpoint(self.out, done, model_state, optim_state, self.cfg.to_dict(), state,
                                   keep_last=self.cfg.train.keep_last)
        distributed.barrier(self.info)
        return path


def _sharded():
    """FSDP2 state helpers, imported only by sharded runs: ``torch.distributed.checkpoint`` costs
    most of a second to import, which every other command would pay through ``TrainingStopped``."""
    from . import sharded_state

    return sharded_state


def _monitor_batch(data: TokenShards, seq_len: int) -> torch.Tensor:
    """The fixed batch the training monitors read: the first ``MONITOR_WINDOWS`` validation
    windows (enough tokens for the collapse quantiles, a fraction of a training step to run)."""
    first = next(data.iter_eval_batches(MONITOR_WINDOWS, seq_len, max_batches=1), None)
    if first is None:
        raise DataError("the validation split is too small for one evaluation window")
    return first[0]


__all__ = ["TrainingInterrupted", "TrainingStopped", "load_data", "train"]

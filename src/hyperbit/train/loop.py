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

A step never waits for the device: its loss and gradient norm stay on it, and the host reads them
back only on a step that logs (every ``train.log_every``), evaluates, monitors or saves. A
non-finite loss (or, without an fp16 gradient scaler, gradient norm) is recorded on the device
with its step, and the run stops with :class:`TrainingStopped` at the next of those steps, naming
the first bad step; it is checked before every checkpoint is written, so every checkpoint holds
finite weights, and the message names the last one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from ..analysis import check_wiring, pathway_summary
from ..analysis.monitor import MONITOR_WINDOWS
from ..config import ConfigError
from ..data import DataError, TokenShards, prepare_data, read_meta
from ..data.digits import ImageSet, load_image_data
from ..models import build_model
from ..models.fast import compile_blocks, set_activation_checkpointing
from . import distributed
from .allocator import ENV, keep_freed_memory
from .batches import rank_batch, to_device
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import METRICS_FILE, RUN_CONFIG_FILE, RunConfig
from .errors import TrainingInterrupted, TrainingStopped
from .evaluate import evaluate
from .interrupt import StopRequests
from .metrics import Progress, open_tensorboard, truncate_metrics, write_metrics
from .optim import make_optimizer
from .precision import autocast as autocast_for
from .precision import describe, grad_scaler, resolve_precision
from .rng import restore_rng_state
from .rundir import open_run, remove_unstarted
from .schedule import apply_schedule


def load_data(cfg: RunConfig, out: Path, log: Callable[[str], None]) -> tuple[TokenShards, TokenShards | None]:
    """Token shards for the run: a prepared directory, or the corpus tokenised once into out/data.
    The validation split is None when the prepared directory has none (``--val-fraction 0``):
    the run then trains without evaluations and monitors, and says so. A vision transformer
    (``model.arch=vit``) reads its images instead (:func:`hyperbit.data.digits.load_image_data`)."""
    if cfg.model.arch == "vit":
        return load_image_data(cfg.data.path)
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
    device = distributed.train_device(cfg.train.device if cfg is not None else _saved_device(out))
    info = distributed.setup(device)
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
        with _determinism(cfg.train.deterministic):
            kept = device.type == "cpu" and keep_freed_memory()  # before the first tensors of the run
            loop = _Loop(cfg, out, resume, log, info, device)
            log(describe("auto" if auto else cfg.train.precision, device))
            if kept:
                log(f"CPU allocator: freed memory kept for the next step ({ENV}=0 leaves it as it is)")
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
        # torchtitan's order: checkpointing, then compile per block, then shard / wrap
        if t.activation_checkpointing:
            set_activation_checkpointing(model, True)
        if t.compile:
            compile_blocks(model)
        self.runner = distributed.wrap(model, t.distributed, info, device, t.precision)
        self.optimizer = make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))  # fused on CUDA
        self.scaler = grad_scaler(t.precision, device)
        self.autocast = autocast_for(t.precision, device)
        self.start = self.completed = 0  # completed: steps this process has finished
        # the first non-finite step, on the device: (step, loss, gradient norm); step 0 = none yet
        self.first_bad = torch.zeros(3, dtype=torch.float64, device=device)
        if ckpt is not None:
            self._resume(ckpt)

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
        loss_value = None  # the loss last read back from the device (shown by the progress line)

        def record(entry: dict) -> None:
            write_metrics(metrics_file, entry, board)

        try:
            for step in range(self.start, t.steps):
                lr = apply_schedule(self.optimizer, schedule, step)
                loss, grad_norm = self._step(step)  # on the device
                done = step + 1
                self.completed += 1
                log_now = done % max(1, t.log_every) == 0 or done == t.steps
                eval_now = (t.eval_every and done % t.eval_every == 0) or done == t.steps
                monitor_now = monitor_idx is not None and (done % t.monitor_every == 0 or done == t.steps)
                stop = distributed.any_rank(stops.requested, info) and done < t.steps
                save_now = (t.save_every and done % t.save_every == 0) or done == t.steps or stop
                if log_now or eval_now or monitor_now or save_now:
                    self._check_finite()  # the host waits for the device here, and only here
                if log_now:
                    loss_value, grad_value = float(loss), float(grad_norm)
                    if info.is_main:
                        last = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                                "tokens": done * tokens_per_step, **progress.rates(done),
                                **{k: float(v) for k, v in self.moe_step.items()}}
                        record(last)
                progress.update(done, loss_value)
                if eval_now:
                    evaluation = self._evaluate()
                    if evaluation is not None:
                        record({"step": done, **evaluation})
                        progress.note(f"step {done}: val loss {evaluation['val_loss']:.4f}, "
                                      + (f"{evaluation['val_bpb']:.4f} bits/byte" if "val_bpb" in evaluation
                                         else f"test accuracy {evaluation['val_acc']:.4f}"))
                        last.update(evaluation)
                if monitor_now:
                    if info.is_main or self.sharded:
                        with self.autocast:
                            summary = pathway_summary(self.model, monitor_idx)
                        if info.is_main:
                            record({"step": done, "monitor": summary})
                if save_now:
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

    def _step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the step's global batch; returns the loss (mean over the ranks)
        and the gradient norm as tensors on the device: nothing here waits for the device."""
        t, info, device = self.cfg.train, self.info, self.device
        total = torch.zeros((), device=device)
        # this rank's rows of every micro-batch of the step's global batch (see batches.py)
        xs, ys = rank_batch(self.train_data, step, t.batch_size, t.seq_len, t.seed, t.grad_accum,
                            info.rank, info.world_size)
        xs, ys = to_device(xs, device), to_device(ys, device)  # (grad_accum, per_rank, seq_len)
        self.moe_step: dict = {}  # MoE: balance, z-loss, dropped fraction (mean over micro-batches)
        for m in range(t.grad_accum):
            with distributed.grad_sync(self.runner, m == t.grad_accum - 1):  # reduce once per step
                with self.autocast:
                    loss = self.runner(xs[m], ys[m])[1] / t.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
            for key, value in self.model.moe_stats().items():
                self.moe_step[key] = self.moe_step.get(key, 0.0) + value.detach() / t.grad_accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip) if t.clip > 0
                     else torch.zeros((), device=device))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        loss = distributed.mean_over_ranks(total, info)
        self._track(step, loss, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _track(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record on the device the first step whose loss (or gradient norm) is not finite.
        fp16: an overflowing gradient is the scaler's business (it skips the step, lowers the scale)."""
        bad = ~torch.isfinite(loss)
        if not self.scaler.is_enabled():
            bad = bad | ~torch.isfinite(grad_norm)
        now = torch.stack([torch.full((), float(step + 1), dtype=torch.float64, device=self.device),
                           loss.double(), grad_norm.double()])
        self.first_bad = torch.where(bad & (self.first_bad[0] == 0), now, self.first_bad)

    def _check_finite(self) -> None:
        """Raise TrainingStopped if a step since the start was not finite (a host synchronisation).
        Called before every checkpoint, so none holds what followed a non-finite step."""
        step, loss, grad = self.first_bad.tolist()
        if step:
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            kept = latest_checkpoint(self.out)
            raise TrainingStopped(f"non-finite {what} at step {int(step)} (loss {loss:.6g}, gradient "
                                  f"norm {grad:.6g}); last good checkpoint: {kept or 'none'}")

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


def _saved_device(out: Path) -> str | None:
    """``train.device`` of the run saved in ``out`` (a bare ``--resume``), None when unreadable."""
    try:
        return RunConfig.load(out / RUN_CONFIG_FILE).train.device
    except ConfigError:
        return None


@contextmanager
def _determinism(enabled: bool):
    """``train.deterministic``: deterministic kernels for the run (cuBLAS with a fixed workspace,
    deterministic attention backward, ...), then the process's previous setting back. Ops that have
    no deterministic kernel warn instead of failing."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _sharded():
    """FSDP2 state helpers, imported only by sharded runs: ``torch.distributed.checkpoint`` costs
    most of a second to import, which every other command would pay through ``TrainingStopped``."""
    from . import sharded_state

    return sharded_state


def _monitor_batch(data: TokenShards, seq_len: int) -> torch.Tensor:
    """The fixed batch the training monitors read: the first ``MONITOR_WINDOWS`` validation
    windows (enough tokens for the collapse quantiles, a fraction of a training step to run); for
    images, the first 8 test images."""
    if isinstance(data, ImageSet):
        return data.images[:8]
    first = next(data.iter_eval_batches(MONITOR_WINDOWS, seq_len, max_batches=1), None)
    if first is None:
        raise DataError("the validation split is too small for one evaluation window")
    return first[0]


__all__ = ["TrainingInterrupted", "TrainingStopped", "load_data", "train"]

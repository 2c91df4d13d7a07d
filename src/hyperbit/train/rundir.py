"""Starting, resuming and replacing a run directory, one writer at a time.

A run directory belongs to one training process while it trains: :class:`RunLock` holds
``.lock`` (the owner's pid, host and start time) and a second writer gets one clear line. A lock
left by a process that is no longer running is recognised as stale and taken over. ``--overwrite``
only replaces a directory that is a hyperbit run (it has ``config.json``) and is not locked.

``--resume`` continues the saved run. The config it is given may change what does not make it a
different run (:data:`RESUMABLE`: the number of steps, how often it logs, evaluates, monitors and
saves, where and how it runs: device, distribution, compilation, activation checkpointing,
deterministic kernels); any other difference is refused, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .._io import atomic_write_text
from ..config import ConfigError
from .config import RUN_CONFIG_FILE, RunConfig, flatten, override_run_config

LOCK_FILE = ".lock"
RESUMABLE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.save_every",
    "train.monitor_every", "train.keep_last", "train.check_wiring", "train.compile", "train.device",
    "train.distributed", "train.activation_checkpointing", "train.deterministic",
})


def resume_config(out: str | Path, overrides: list[str]) -> RunConfig:
    """The saved config of the run in ``out`` with ``section.key=value`` overrides on top."""
    config_file = Path(out) / RUN_CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"nothing to resume in {out}: no {RUN_CONFIG_FILE} there (drop --resume "
                          "to start a new run)")
    return override_run_config(RunConfig.load(config_file), overrides)


def check_resumable(saved: RunConfig, given: RunConfig) -> None:
    """Refuse, naming the first key, a config that would make the saved run a different run."""
    a, b = flatten(saved.to_dict()), flatten(given.to_dict())
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and key not in RESUMABLE:
            raise ConfigError(f"--resume with a different config than the saved run ({key}: saved "
                              f"{a.get(key)!r}, given {b.get(key)!r}); only "
                              f"{', '.join(sorted(RESUMABLE))} may change: train into a new --out")


class RunLock:
    """``out/.lock``, created exclusively; :meth:`release` removes it (only if it is still ours)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return self
        raise ConfigError(f"cannot lock {self.path.parent}: another process took it at the same moment")

    def _check_stale(self) -> None:
        owner = read_lock(self.path.parent)
        if owner is not None and _alive(owner):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
            raise ConfigError(f"run directory {self.path.parent} is in use by process {owner['pid']} on "
                              f"{owner['host']} (since {when}); wait for it to finish or stop it")
        self.path.unlink(missing_ok=True)  # stale: its process is gone (or the file is unreadable)

    def release(self) -> None:
        if self.held:
            owner = read_lock(self.path.parent)
            if owner is not None and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def read_lock(out: Path) -> dict | None:
    """The owner recorded in ``out/.lock``, or None when there is none (or it is unreadable)."""
    try:
        owner = json.loads((Path(out) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _alive(owner: dict) -> bool:
    """Whether the lock's process is still running. A lock from another host cannot be checked
    from here and counts as live."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def open_run(out: Path, cfg: RunConfig | None, resume: bool, overwrite: bool) -> tuple[RunConfig, RunLock, bool]:
    """Create, resume or replace the run directory and lock it; never touches a directory that is
    not ours. Returns the run's config, the held lock and whether the directory is new (made by
    this call, so a run that never starts can remove it again). With ``resume`` and ``cfg=None``
    the saved config is used; a given ``cfg`` may differ from it only in :data:`RESUMABLE` keys."""
    config_file = out / RUN_CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a run directory")
    existing = out.is_dir() and any(out.iterdir())
    if resume and not config_file.is_file():
        what = "is not a hyperbit run directory" if existing else "does not exist"
        raise ConfigError(f"nothing to resume: {out} {what} (no {RUN_CONFIG_FILE}); drop --resume "
                          "to start a new run")
    if cfg is None and not resume:
        raise ConfigError("a new run needs a config")
    if existing and not resume:
        if not overwrite:
            raise ConfigError(f"run directory {out} already exists; pass --resume to continue it or "
                              "--overwrite to replace it")
        if not config_file.is_file():
            raise ConfigError(f"refusing to overwrite {out}: it is not a hyperbit run directory")
    new = not existing
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()
    try:
        if resume:
            saved = RunConfig.load(config_file)
            if cfg is None:
                return saved, lock, False
            if cfg.train.precision == "auto":  # "whatever the run uses"
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                    cfg.train, precision=saved.train.precision))
            check_resumable(saved, cfg)
        elif existing:  # --overwrite: everything but our lock goes
            for child in out.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            new = True
        atomic_write_text(config_file, cfg.to_json() + "\n")
    except BaseException:
        lock.release()
        raise
    return cfg, lock, new


def remove_unstarted(out: Path, lock: RunLock) -> None:
    """Remove a run directory this process created when no training step completed in it."""
    lock.release()
    shutil.rmtree(out, ignore_errors=True)

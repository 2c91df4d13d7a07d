"""Crash-safe training checkpoints: safetensors for tensors, JSON for everything else, no pickles.

Layout of one run::

    run_dir/checkpoints/
        latest                    text file: the name of the newest complete step dir
        step_00000300/
            model.safetensors     model.state_dict(); tied tensors stored once (aliases in metadata)
            optimizer.safetensors every tensor of optimizer.state_dict() ("state.{i}.{name}")
            optimizer.json        param_groups and non-tensor state, tensors as {"__tensor__": key}
            config.json           the config dict given to save_checkpoint
            state.json            step, the caller's state (data position, ...) and RNG states
            COMPLETE              written last: {"files": {name: {"size", "sha256"}}, ...}

A step dir is written under a temporary name (``.tmp-step_...``) in the same parent, fsynced and
renamed into place; ``latest`` is then replaced atomically (temp file + rename). A kill at any
moment therefore leaves ``latest`` pointing at a complete, verified checkpoint, and nothing with a
temporary name is ever picked up. An existing step dir is never overwritten.

Loading verifies COMPLETE and every file's size and sha256 before touching the model, so a
truncated, flipped or half-written file, or a checkpoint of another model shape, raises
:class:`CheckpointError` with a one-line message and leaves ``model`` and ``optimizer`` unchanged.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import warnings
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .._io import fsync_dir, hash_and_sync, sha256_file, write_new_file
from .errors import CheckpointError, first_line
from .rng import capture_rng_state
from .state_codec import (FORMAT, OPTIM_TENSORS, decode_optimizer, dedupe, encode_optimizer, identity,
                          json_bytes, read_json, read_tensors)

VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
OPTIM_JSON = "optimizer.json"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
REQUIRED = (MODEL_FILE, CONFIG_FILE, STATE_FILE)
RESERVED_STATE_KEYS = ("step", "rng")
STEP_DIR = re.compile(r"^step_(\d{8,})$")


# ================================================================================================
# save
# ================================================================================================

def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, config: dict, state: dict | None = None,
                    *, keep_last: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}/`` atomically, point ``latest`` at it and return it.

    ``state`` is any JSON-able dict (data position, best loss, ...); ``step`` and the RNG states
    (python, numpy, torch CPU, every CUDA device) are added under ``"step"`` and ``"rng"``.
    ``keep_last=K`` then deletes all but the K highest-step checkpoints, never the one ``latest``
    names. Raises :class:`CheckpointError` if the step dir already exists and ``latest`` names it,
    or if ``config`` / ``state`` cannot be stored. A complete step dir that ``latest`` does not
    name (left by a kill between the rename and the ``latest`` update) is moved aside to
    ``step_XXXXXXXX.superseded-N``, never deleted.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
        raise CheckpointError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    state = dict(state or {})
    clash = [k for k in RESERVED_STATE_KEYS if k in state]
    if clash:
        raise CheckpointError(f"state must not contain the reserved key(s) {clash}; "
                              "save_checkpoint records the step and RNG states itself")
    if not isinstance(config, dict):
        raise CheckpointError(f"config must be a dict (e.g. ModelConfig.to_dict()), got {type(config).__name__}")

    # Everything that can fail on bad input is serialised before anything touches the disk.
    config_bytes = json_bytes(config, "config", indent=2)
    state_bytes = json_bytes({"step": step, **state, "rng": capture_rng_state()}, "state")
    model_tensors, model_meta = dedupe(model.state_dict(), "model")
    optim_tensors: dict[str, Tensor] = {}
    optim_meta: dict[str, str] = {}
    optim_bytes = None
    if optimizer is not None:
        encoded, optim_tensors = encode_optimizer(optimizer.state_dict())
        optim_bytes = json_bytes(encoded, "optimizer state")
        optim_tensors, optim_meta = dedupe(optim_tensors, "optimizer")

    ckpt_dir = Path(run_dir) / CHECKPOINTS
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_file(model_tensors, str(tmp / MODEL_FILE), metadata=model_meta)
        files = [MODEL_FILE]
        if optimizer is not None:
            save_file(optim_tensors, str(tmp / OPTIM_TENSORS), metadata=optim_meta)
            write_new_file(tmp / OPTIM_JSON, optim_bytes)
            files += [OPTIM_TENSORS, OPTIM_JSON]
        write_new_file(tmp / CONFIG_FILE, config_bytes)
        write_new_file(tmp / STATE_FILE, state_bytes)
        files += [CONFIG_FILE, STATE_FILE]
        manifest = {"format": FORMAT, "version": VERSION, "step": step,
                    "files": {f: hash_and_sync(tmp / f) for f in files}}
        write_new_file(tmp / COMPLETE, json_bytes(manifest, "manifest", indent=1))
        fsync_dir(tmp)
        if final.exists() or final.is_symlink():
            _move_aside(ckpt_dir, name)
        os.rename(tmp, final)
    except BaseException:
        _remove_tree(tmp)
        raise
    fsync_dir(ckpt_dir)
    _write_latest(ckpt_dir, name)
    if keep_last is not None:
        _prune(ckpt_dir, keep_last)
    return final


def _move_aside(ckpt_dir: Path, name: str) -> None:
    if _read_latest(ckpt_dir) == name:
        raise CheckpointError(f"checkpoint {ckpt_dir / name} already exists and is the latest one; "
                              "refusing to overwrite it")
    k = 1
    while (ckpt_dir / f"{name}.superseded-{k}").exists():
        k += 1
    aside = ckpt_dir / f"{name}.superseded-{k}"
    warnings.warn(f"{ckpt_dir / name} exists but is not the latest checkpoint; moved it to {aside}",
                  stacklevel=3)
    os.rename(ckpt_dir / name, aside)


def _write_latest(ckpt_dir: Path, name: str) -> None:
    tmp = ckpt_dir / f".tmp-{LATEST}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write_new_file(tmp, (name + "\n").encode())
        os.replace(tmp, ckpt_dir / LATEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(ckpt_dir)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` highest steps, never the one ``latest`` names. Each dir is
    first renamed to ``.deleting-...`` so a kill mid-delete never leaves a half step dir."""
    latest = _read_latest(ckpt_dir)
    steps = sorted(_step_dirs(ckpt_dir), key=lambda p: step_of(p.name), reverse=True)
    for path in steps[keep_last:]:
        if path.name == latest:
            continue
        doomed = ckpt_dir / f".deleting-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        _remove_tree(doomed)
    fsync_dir(ckpt_dir)


# ================================================================================================
# load
# ================================================================================================

def load_checkpoint(path_or_run_dir: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device | int = "cpu") -> dict[str, Any]:
    """Verify a checkpoint and load it into ``model`` (strict) and ``optimizer``.

    ``path_or_run_dir``: a run dir (follows ``checkpoints/latest``), a checkpoints dir, or a step
    dir. Returns ``{"path": step_dir, "step": int, "config": dict, "state": dict}`` where
    ``state`` is state.json (``step``, the caller's keys, ``rng``); pass it to
    :func:`restore_rng_state` to continue bitwise identically. Every problem raises
    :class:`CheckpointError`; ``model`` and ``optimizer`` are only modified once all checks pass.
    Nothing is unpickled.
    """
    step_dir = resolve_checkpoint(path_or_run_dir)
    manifest = _verify(step_dir)
    config = read_json(step_dir / CONFIG_FILE)
    state = read_json(step_dir / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"corrupt checkpoint file {step_dir / STATE_FILE}: no integer 'step'")
    device = str(map_location) if not isinstance(map_location, int) else map_location

    model_sd = None
    if model is not None:
        model_sd = read_tensors(step_dir / MODEL_FILE, device)
        _check_model(model, model_sd, step_dir)
    optim_sd = None
    if optimizer is not None:
        if OPTIM_JSON not in manifest["files"] or OPTIM_TENSORS not in manifest["files"]:
            raise CheckpointError(f"checkpoint {step_dir} has no optimizer state (saved with optimizer=None)")
        tensors = read_tensors(step_dir / OPTIM_TENSORS, device)
        optim_sd = decode_optimizer(read_json(step_dir / OPTIM_JSON), tensors, step_dir / OPTIM_JSON)
        _check_optimizer(optimizer, optim_sd, step_dir)

    if model_sd is not None:
        try:
            model.load_state_dict(model_sd, strict=True)
        except RuntimeError as e:  # pre-checked above; kept as a guard
            raise CheckpointError(f"checkpoint {step_dir} does not match the model: {first_line(e)}") from None
    if optim_sd is not None:
        try:
            optimizer.load_state_dict(optim_sd)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {step_dir} does not match the optimizer: {first_line(e)}") from None
    return {"path": step_dir, "step": state["step"], "config": config, "state": state}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step dir a run dir / checkpoints dir / step dir refers to (not yet verified)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file; expected a run dir, "
                              "a checkpoints dir or a step dir")
    if (path / COMPLETE).exists():
        return path  # a step dir
    if (path / CHECKPOINTS).is_dir():
        ckpt_dir = path / CHECKPOINTS  # a run dir
    elif (path / LATEST).exists() or _step_dirs(path):
        ckpt_dir = path  # a checkpoints dir
    elif STEP_DIR.match(path.name) or (path / MODEL_FILE).exists() or (path / STATE_FILE).exists():
        return path  # a step dir without COMPLETE: _verify reports it as incomplete
    else:
        raise CheckpointError(f"no checkpoint found in {path}")
    latest = _read_latest(ckpt_dir)
    if latest is not None:
        target = ckpt_dir / latest
        if not target.is_dir():
            raise CheckpointError(f"{ckpt_dir / LATEST} points to {latest}, which does not exist")
        return target
    # No `latest` (a kill before the first one was written): the highest complete step dir.
    for candidate in sorted(_step_dirs(ckpt_dir), key=lambda p: step_of(p.name), reverse=True):
        if (candidate / COMPLETE).is_file():
            return candidate
    raise CheckpointError(f"no checkpoint found in {path}")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The step dir ``load_checkpoint(run_dir)`` would load, or None if there is none yet.
    Useful for resume-if-present; raises CheckpointError if ``latest`` is unreadable or dangling."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError as e:
        if str(e).startswith("no checkpoint found"):
            return None
        raise


def _read_latest(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    if not path.exists():
        return None
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable {path}: {first_line(e)}") from None
    if not STEP_DIR.match(name):
        raise CheckpointError(f"corrupt {path}: expected a step dir name like step_00000100, got {name[:40]!r}")
    return name


def _verify(step_dir: Path) -> dict:
    marker = step_dir / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"incomplete checkpoint {step_dir}: no {COMPLETE} marker")
    manifest = read_json(marker)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != FORMAT
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                       and isinstance(v.get("sha256"), str) for v in files.values())):
        raise CheckpointError(f"corrupt checkpoint manifest {marker}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"unsupported checkpoint version {manifest.get('version')!r} in {marker}; "
                              f"this hyperbit reads version {VERSION}")
    for name in REQUIRED:
        if name not in files:
            raise CheckpointError(f"corrupt checkpoint manifest {marker}: {name} is not listed")
    for name, entry in files.items():
        path = step_dir / name
        if "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"corrupt checkpoint manifest {marker}: bad file name {name!r}")
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file {path}")
        size = path.stat().st_size
        if size < entry["size"]:
            raise CheckpointError(f"truncated checkpoint file {path}: {size} bytes, expected {entry['size']}")
        if size != entry["size"]:
            raise CheckpointError(f"corrupt checkpoint file {path}: {size} bytes, expected {entry['size']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise CheckpointError(f"corrupt checkpoint file {path}: sha256 mismatch "
                                  f"(expected {entry['sha256'][:12]}..., got {digest[:12]}...)")
    return manifest


def _check_model(model: nn.Module, loaded: dict[str, Tensor], step_dir: Path) -> None:
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in loaded:
            missing = [k for k in expected if k not in loaded]
            raise CheckpointError(f"checkpoint {step_dir} does not match the model: model key {key!r} "
                                  f"is missing from the checkpoint ({len(missing)} missing in all)")
        if tuple(loaded[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"checkpoint {step_dir} does not match the model: {key} has shape "
                                  f"{tuple(loaded[key].shape)} in the checkpoint but {tuple(ref.shape)} "
                                  "in the model")
    extra = [k for k in loaded if k not in expected]
    if extra:
        raise CheckpointError(f"checkpoint {step_dir} does not match the model: checkpoint key "
                              f"{extra[0]!r} is not in the model ({len(extra)} unexpected in all)")
    # Tied parameters (e.g. embed/head) must not receive two different tensors.
    groups: dict[tuple, list[str]] = {}
    for key, ref in expected.items():
        groups.setdefault(identity(ref), []).append(key)
    for keys in groups.values():
        for other in keys[1:]:
            if not torch.equal(loaded[keys[0]], loaded[other]):
                raise CheckpointError(f"checkpoint {step_dir} does not match the model: the model ties "
                                      f"{other} to {keys[0]} but the checkpoint stores different values")


def _check_optimizer(optimizer: torch.optim.Optimizer, sd: dict, step_dir: Path) -> None:
    saved, current = sd["param_groups"], optimizer.param_groups
    where = f"checkpoint {step_dir} does not match the optimizer"
    if len(saved) != len(current):
        raise CheckpointError(f"{where}: {len(saved)} param groups saved, {len(current)} in the optimizer")
    for i, (s, c) in enumerate(zip(saved, current)):
        if len(s["params"]) != len(c["params"]):
            raise CheckpointError(f"{where}: param group {i} has {len(s['params'])} params saved, "
                                  f"{len(c['params'])} in the optimizer")
    index_to_param = dict(zip(chain.from_iterable(g["params"] for g in saved),
                              chain.from_iterable(g["params"] for g in current)))
    for index, pstate in sd["state"].items():
        if index not in index_to_param:
            raise CheckpointError(f"{where}: state for param {index!r}, which no param group lists")
        param = index_to_param[index]
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            value = pstate.get(name)
            if isinstance(value, Tensor) and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{where}: state.{index}.{name} has shape {tuple(value.shape)} "
                                      f"in the checkpoint but the param has {tuple(param.shape)}")


# ================================================================================================
# helpers
# ================================================================================================

def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    try:
        return [p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    except OSError:
        return []


def step_of(name: str) -> int:
    """The step of a step dir name (``step_00000300`` -> 300)."""
    return int(STEP_DIR.match(name).group(1))

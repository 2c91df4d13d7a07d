"""How a checkpoint's tensors and optimizer state become files: safetensors for tensors, JSON for
everything else, nothing pickled.

A state dict's tensors are stored once each (:func:`dedupe`): the names of tied tensors are kept
as aliases in the safetensors metadata. An optimizer ``state_dict()`` is encoded as JSON
(:func:`encode_optimizer`) with every tensor replaced by ``{"__tensor__": key}`` and stored in a
safetensors file under that key; tuples become ``{"__tuple__": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .errors import CheckpointError, first_line

FORMAT = "hyperbit-checkpoint"
OPTIM_TENSORS = "optimizer.safetensors"


def encode_optimizer(osd: dict) -> tuple[dict, dict[str, Tensor]]:
    """An optimizer ``state_dict()`` as a JSON-able dict and the tensors it refers to by key."""
    tensors: dict[str, Tensor] = {}
    encoded = {
        "param_groups": [_encode(g, f"param_groups.{i}", tensors) for i, g in enumerate(osd["param_groups"])],
        "state": {str(i): {name: _encode(v, f"state.{i}.{name}", tensors) for name, v in s.items()}
                  for i, s in osd["state"].items()},
    }
    return encoded, tensors


def identity(t: Tensor) -> tuple:
    if t.numel() == 0 or t.device.type == "meta":
        return ("unique", id(t))
    return (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def dedupe(tensors: dict[str, Tensor], what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Distinct tensors once (CPU, contiguous, own storage) + ``{"aliases": json}`` metadata for
    the names that are the very same tensor (tied weights). safetensors refuses shared storage."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {what} tensor {name}: it is on the meta device")
        ident = identity(t)
        if ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        storage = (str(t.device), t.untyped_storage().data_ptr())
        shares = t.numel() > 0 and storage in storages
        storages.add(storage)
        t = t.cpu()
        if shares or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        unique[name] = t
    return unique, {"format": FORMAT, "aliases": json.dumps(aliases, sort_keys=True)}


def read_tensors(path: Path, device: str | int) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get("aliases", "{}"))
        if not isinstance(aliases, dict):
            raise ValueError("aliases metadata is not a JSON object")
    except Exception as e:  # SafetensorError, JSON errors, OSError, device errors
        raise CheckpointError(f"corrupt checkpoint file {path}: not a readable safetensors file "
                              f"({first_line(e)})") from None
    for name, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"corrupt checkpoint file {path}: alias {name} -> missing {target}")
        tensors[name] = tensors[target]
    return tensors


def _encode(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able form of an optimizer state_dict value; tensors go to ``tensors[key]``."""
    if isinstance(value, Tensor):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"cannot store optimizer value {key}: non-string key {bad[0]!r}")
        return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot store optimizer value {key} of type {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, Tensor], path: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, path) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            if value["__tensor__"] not in tensors:
                raise CheckpointError(f"corrupt checkpoint file {path}: tensor {value['__tensor__']!r} "
                                      f"is not in {OPTIM_TENSORS}")
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors, path) for v in value["__tuple__"])
        return {k: _decode(v, tensors, path) for k, v in value.items()}
    return value


def decode_optimizer(data: Any, tensors: dict[str, Tensor], path: Path) -> dict:
    if (not isinstance(data, dict) or not isinstance(data.get("param_groups"), list)
            or not isinstance(data.get("state"), dict)):
        raise CheckpointError(f"corrupt checkpoint file {path}: expected param_groups and state")
    groups = _decode(data["param_groups"], tensors, path)
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"corrupt checkpoint file {path}: a param group has no params list")
    state = {}
    for k, v in data["state"].items():
        if not isinstance(v, dict):
            raise CheckpointError(f"corrupt checkpoint file {path}: state {k!r} is not an object")
        state[int(k) if k.lstrip("-").isdigit() else k] = _decode(v, tensors, path)
    return {"state": state, "param_groups": groups}


def json_bytes(obj: Any, what: str, indent: int | None = None) -> bytes:
    try:
        text = json.dumps(obj, indent=indent, separators=None if indent else (",", ":"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serialisable: {first_line(e)}") from None
    return (text + "\n").encode("utf-8")


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file; a CheckpointError naming it when it is missing or not JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {path}: invalid JSON ({first_line(e)})") from None

"""The packed ternary inference format: a BitNet checkpoint as 2-bit codes, loadable without ever
materialising a full-precision linear weight.

A packed directory (``hyperbit export RUN --format packed OUT``)::

    packed.json         {"format": "hyperbit-packed", "version": 1, "config": <the RunConfig dict>,
                         "step", "source", "tokenizer": "tokenizer.json",
                         "packed_linears": [module names], "files": {name: {"size", "sha256"}}}
    model.safetensors   for every BitLinear ``name``: ``name.packed`` (uint8, (out/4, in), the
                        Hugging Face ``bitnet`` layout of :mod:`hyperbit.nn.packed`) and
                        ``name.weight_scale`` (fp32 scalar, multiplies); for every BitNet expert
                        stack (mixture of experts) the same per expert: (E, out/4, in) and (E,)
                        (:mod:`hyperbit.nn.packed_moe`); every other tensor
                        (embeddings, norms, head, connection weights) as the model holds it; tied
                        tensors stored once (``aliases`` metadata, as in checkpoints)
    tokenizer.json      the tokenizer (:meth:`Tokenizer.save`), so the directory stands alone

The tensor names are exactly the ``state_dict`` keys of the model with every ``BitLinear`` swapped
for a :class:`~hyperbit.nn.PackedBitLinear` and every BitNet ``ExpertLinear`` for a
:class:`~hyperbit.nn.packed_moe.PackedExpertLinear`. :func:`load_packed` builds that model on the meta
device, checks every stored name, shape and dtype against it, then assigns the stored tensors:
the only linear weights that ever exist are the uint8 codes (and their int8 unpacking).
Problems raise :class:`CheckpointError` with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .._io import hash_and_sync, sha256_file, write_new_file
from ..data import Tokenizer, load_tokenizer
from ..models import build_model
from ..nn import BitLinear, PackedBitLinear
from ..nn.moe import ExpertLinear
from ..nn.packed_moe import PackedExpertLinear
from ..nn.rope import RotaryEmbedding
from ..train.config import RunConfig
from ..train.errors import CheckpointError, first_line
from ..train.state_codec import dedupe, json_bytes, read_tensors

FORMAT = "hyperbit-packed"
VERSION = 1
PACKED_FILE = "packed.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED_KEYS = ("format", "version", "config", "step", "tokenizer", "packed_linears", "files")

__all__ = ["FORMAT", "PACKED_FILE", "VERSION", "is_packed_dir", "load_packed", "pack_model", "pack_modules",
           "write_packed"]


def is_packed_dir(path: str | Path) -> bool:
    """Whether ``path`` is a packed directory (it holds ``packed.json``)."""
    return (Path(path) / PACKED_FILE).is_file()


def _ternary(m: nn.Module) -> bool:
    """Whether ``m`` is a layer the packed format stores as codes: a BitLinear, or BitNet experts."""
    return isinstance(m, BitLinear) or (isinstance(m, ExpertLinear) and m.bitnet)


def _ternary_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if _ternary(m)}


def _packed(layer: nn.Module, label: str | None = None) -> nn.Module:
    """The packed form of a BitLinear or of BitNet experts (CheckpointError naming ``label``, or
    the layer, if it cannot be packed)."""
    try:
        if isinstance(layer, ExpertLinear):
            return PackedExpertLinear.from_expert_linear(layer)
        return PackedBitLinear.from_bitlinear(layer)
    except ValueError as e:
        raise CheckpointError(f"cannot pack {label or layer}: {first_line(e)}") from None


def _empty_packed(layer: nn.Module) -> nn.Module:
    """An empty packed layer of ``layer``'s shape on the meta device (to be loaded into)."""
    if isinstance(layer, ExpertLinear):
        return PackedExpertLinear(layer.experts, layer.in_features, layer.out_features, device="meta")
    return PackedBitLinear(layer.in_features, layer.out_features, device="meta")


def _swap(model: nn.Module, make) -> list[str]:
    """Replace every BitLinear and BitNet expert stack ``m`` of ``model`` by ``make(m)`` in place;
    returns their names."""
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _ternary(child):
                setattr(parent, child_name, make(child))
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


@torch.no_grad()
def pack_modules(model: nn.Module) -> nn.Module:
    """Swap every BitLinear of ``model`` for its :class:`PackedBitLinear` (BitNet experts for
    their :class:`PackedExpertLinear`), in place (an in-memory conversion; the latent weights are
    released). Returns ``model``."""
    _swap(model, _packed)
    return model


@torch.no_grad()
def pack_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The packed ``state_dict`` of ``model`` (every BitLinear as codes + scale) and the names of
    the packed linears; ``model`` itself is left unchanged."""
    linears = _ternary_layers(model)
    if not linears:
        raise CheckpointError("the model has no BitLinear layers; nothing to pack")
    state = dict(model.state_dict())
    for name, layer in linears.items():
        packed = _packed(layer, name)
        del state[f"{name}.weight"]
        for key, t in packed.state_dict().items():
            state[f"{name}.{key}"] = t
    return state, sorted(linears)


def write_packed(model: nn.Module, run_config: RunConfig, tokenizer: Tokenizer, info: dict[str, Any],
                 out_dir: str | Path) -> None:
    """Writer of the ``packed`` export format (``runs.EXPORT_FORMATS``): fills the existing empty
    directory ``out_dir``. Refuses a model that is not BitNet (``model.linear != "bitnet"``)."""
    if run_config.model.linear != "bitnet":
        raise CheckpointError(f"checkpoint {info.get('path')} has model.linear={run_config.model.linear!r}; "
                              "the packed format holds BitNet checkpoints only (model.linear='bitnet')")
    out_dir = Path(out_dir)
    state, names = pack_model(model)
    tensors, meta = dedupe(state, "model")
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={**meta, "format": FORMAT})
    tokenizer.save(out_dir / TOKENIZER_FILE)
    files = {f: hash_and_sync(out_dir / f) for f in (WEIGHTS_FILE, TOKENIZER_FILE)}
    header = {"format": FORMAT, "version": VERSION, "config": run_config.to_dict(),
              "step": info.get("step"), "source": str(info.get("path")), "tokenizer": TOKENIZER_FILE,
              "packed_linears": names, "files": files}
    write_new_file(out_dir / PACKED_FILE, json_bytes(header, "packed header", indent=2))


def read_header(path: Path) -> dict[str, Any]:
    """``packed.json`` of a packed directory, checked key by key (one CheckpointError line)."""
    try:
        header = json.loads((path / PACKED_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path / PACKED_FILE} is not readable JSON ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path / PACKED_FILE} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise CheckpointError(f"{path / PACKED_FILE} lacks the key(s) {missing}; required: {list(REQUIRED_KEYS)}")
    if header["format"] != FORMAT or header["version"] != VERSION:
        raise CheckpointError(f"{path / PACKED_FILE}: format {header['format']!r} version {header['version']!r} "
                              f"is not supported (expected {FORMAT!r} version {VERSION})")
    files = header["files"]
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path / PACKED_FILE}: 'files' must list {WEIGHTS_FILE}")
    for name, entry in files.items():
        if Path(name).name != name:
            raise CheckpointError(f"{path / PACKED_FILE}: file name {name!r} is not a plain name")
        f = path / name
        if not isinstance(entry, dict) or not f.is_file() or f.stat().st_size != entry.get("size"):
            raise CheckpointError(f"packed file {f} is missing or truncated (expected {entry!r})")
        if sha256_file(f) != entry.get("sha256"):
            raise CheckpointError(f"packed file {f} is corrupt (sha256 does not match {PACKED_FILE})")
    return header


def load_packed(path: str | Path, device: str | torch.device = "cpu", *,
                tokenizer: Tokenizer | None = None) -> tuple[nn.Module, RunConfig, Tokenizer, dict[str, Any]]:
    """``(model, run_config, tokenizer, header)`` from a packed directory; the model is in eval
    mode on ``device``, every BitLinear a :class:`PackedBitLinear`. No full-precision linear
    weight is allocated: the model is built on the meta device and the stored tensors assigned."""
    path = Path(path)
    header = read_header(path)
    try:
        cfg = RunConfig.from_dict(header["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / PACKED_FILE}: 'config' is not a usable run config ({first_line(e)})") from None
    if cfg.model.linear != "bitnet":
        raise CheckpointError(f"{path / PACKED_FILE}: model.linear={cfg.model.linear!r}; a packed model is BitNet")
    model = build_model(cfg.model, device="meta")
    names = _swap(model, _empty_packed)
    if sorted(names) != sorted(header["packed_linears"]):
        raise CheckpointError(f"{path / PACKED_FILE}: packed_linears does not match the model of its config")
    stored = read_tensors(path / WEIGHTS_FILE, "cpu")
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not fit its config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, want in expected.items():
        got = stored[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {key} is {got.dtype} {tuple(got.shape)}, "
                                  f"the config needs {want.dtype} {tuple(want.shape)}")
    model.load_state_dict(stored, strict=True, assign=True)
    if cfg.model.tie_embeddings:
        model.head.weight = model.embed.weight
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):  # non-persistent tables: recomputed, not stored
            m._build(cfg.model.max_seq_len)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: nothing stored for {on_meta[:3]}")
    model.to(device)
    tok = tokenizer if tokenizer is not None else _load_tokenizer(path, header)
    return model.eval(), cfg, tok, header


def _load_tokenizer(path: Path, header: dict[str, Any]) -> Tokenizer:
    name = header["tokenizer"]
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(f"{path / PACKED_FILE}: 'tokenizer' must be a file name in the directory, got {name!r}")
    return load_tokenizer(path / name)

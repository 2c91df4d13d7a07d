"""``hyperbit import``: a Hugging Face ``bitnet`` checkpoint as a hyperbit run directory.

The run directory holds what ``hyperbit train`` would have left after step 0::

    config.json        the RunConfig: the imported model, default (or overridden) train / data
    tokenizer.json     a BPE tokenizer (data.tokenizer names this file; a byte tokenizer needs none)
    checkpoints/       one checkpoint (hyperbit.train.checkpoint) at step 0, with a fresh AdamW
                       state, so ``eval``, ``generate``, ``inspect`` and ``train --resume`` accept it

Everything is read and checked before the first file is written: a refusal leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write_text
from ..config import ConfigError
from ..data import ByteTokenizer, DataError, Tokenizer, load_tokenizer
from ..train.checkpoint import save_checkpoint
from ..train.config import RUN_CONFIG_FILE, RunConfig, TrainConfig, override_run_config
from ..train.optim import param_groups
from .hf_bitnet import read_bitnet
from .hf_tokenizer import read_hf_tokenizer

RUN_TOKENIZER = "tokenizer.json"

__all__ = ["import_bitnet", "write_imported_run"]


def _tokenizer(hf_dir: Path, tokenizer: str | Path | Tokenizer | None) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    found = read_hf_tokenizer(hf_dir)
    if found is None:
        raise DataError(f"{hf_dir} has no tokenizer.json; pass --tokenizer byte or a tokenizer file")
    return found


def write_imported_run(out: str | Path, model: nn.Module, tokenizer: Tokenizer, overrides: list[str],
                       source: str) -> Path:
    """Write ``model`` (a TransformerLM) and ``tokenizer`` as a new run directory ``out`` (which
    must not exist or be empty); ``overrides`` are ``train.*`` / ``data.*`` settings of the run.
    Returns the checkpoint's step directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory; choose a new one")
    fixed = [o for o in overrides if o.partition("=")[0].strip().startswith("model.")
             or o.partition("=")[0].strip() == "data.tokenizer"]
    if fixed:
        raise ConfigError(f"override {fixed[0]!r} is not allowed: the model and its tokenizer come from "
                          "the imported checkpoint (use --tokenizer for the tokenizer)")
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"tokenizer vocab_size {tokenizer.vocab_size} ({tokenizer.kind}) does not fit the "
                        f"model's vocab_size {cfg.vocab_size}")
    tok_spec = "byte" if isinstance(tokenizer, ByteTokenizer) else str((out / RUN_TOKENIZER).resolve())
    base = RunConfig(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, tokenizer=tok_spec))
    run_cfg = override_run_config(base, list(overrides))
    t = run_cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer.save(out / RUN_TOKENIZER)
    atomic_write_text(out / RUN_CONFIG_FILE, run_cfg.to_json() + "\n")
    return save_checkpoint(out, 0, model, optimizer, run_cfg.to_dict(), {"imported_from": source})


def import_bitnet(hf_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Read the ``bitnet`` checkpoint ``hf_dir`` (:func:`~.hf_bitnet.read_bitnet`) and write it as
    the run directory ``out``. ``tokenizer``: ``"byte"``, a hyperbit tokenizer file, or None for the
    directory's own ``tokenizer.json``. Returns the step directory written."""
    hf_dir = Path(hf_dir)
    _, model = read_bitnet(hf_dir)
    tok = _tokenizer(hf_dir, tokenizer)
    return write_imported_run(out, model.train(), tok, list(overrides), str(hf_dir.resolve()))

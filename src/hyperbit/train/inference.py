"""Using a trained checkpoint: the model, its run config and the tokenizer it was trained with.

:func:`load_trained` accepts what :func:`~hyperbit.train.checkpoint.load_checkpoint` accepts (a run
dir, its ``checkpoints/`` dir or one ``step_XXXXXXXX`` dir), builds the model from the config stored
*in the checkpoint* and loads the weights into it (verified: sizes, sha256, shapes). The tokenizer
is found the way training found its data (:func:`hyperbit.train.loop.load_data`): the prepared
directory named by ``data.path``, else the run's own ``data/`` directory; its ``meta.json`` names
the tokenizer file. Nothing is unpickled. Every problem raises :class:`CheckpointError`,
:class:`DataError` or :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..data import ByteTokenizer, DataError, TokenShards, Tokenizer, load_tokenizer
from ..models import build_model
from .checkpoint import CHECKPOINTS, CONFIG_FILE, CheckpointError, load_checkpoint, resolve_checkpoint
from .config import RunConfig
from .distributed import pick_device

__all__ = ["VocabMask", "find_run_data", "load_trained", "pick_device", "same_tokenizer"]


def _run_dir_of(step_dir: Path) -> Path | None:
    """The run directory holding ``step_dir`` (``run/checkpoints/step_...``), if it is one."""
    parent = step_dir.resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else None


def find_run_data(cfg: RunConfig, run_dir: Path | None) -> Path | None:
    """The prepared directory the run trained on (:meth:`RunConfig.prepared_data_dir`), or None
    when it is not there (any more)."""
    data_dir = cfg.prepared_data_dir(run_dir) if run_dir is not None else Path(cfg.data.path)
    return data_dir if (data_dir / "meta.json").exists() else None


def _read_config(step_dir: Path) -> RunConfig:
    """The run config stored in the checkpoint, read before the weights so the model can be built.
    A config that cannot be read is reported by a full verification first (it names the damage)."""
    try:
        raw = json.loads((step_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return RunConfig.from_dict(raw)
    except (OSError, UnicodeDecodeError, ValueError, ConfigError, TypeError) as e:
        load_checkpoint(step_dir)  # raises CheckpointError if the checkpoint is damaged
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"checkpoint {step_dir} does not hold a usable run config "
                              f"({CONFIG_FILE}: {msg})") from None


def load_trained(ckpt_path: str | Path, *, device: str | torch.device | None = None,
                 tokenizer: str | Path | Tokenizer | None = None
                 ) -> tuple[nn.Module, RunConfig, Tokenizer, dict[str, Any]]:
    """``(model, run_config, tokenizer, info)`` for a checkpoint; the model is in eval mode on
    ``device`` (None: the run's ``train.device``; ``"auto"`` = CUDA when available).

    ``tokenizer`` overrides the tokenizer lookup (a saved tokenizer file or a Tokenizer). Without
    it the run's prepared data directory is used; when that is gone, a byte-level run (or a run
    whose ``data.tokenizer`` is a tokenizer file that still exists) still works. ``info`` holds
    ``path`` (the step dir), ``step``, ``run_dir`` (or None), ``data_dir`` (the prepared dir the
    tokenizer came from, or None), ``tokenizer_file`` (or None) and ``device``.

    The tokenizer's vocabulary must fit the model: a tokenizer with more ids than the model's
    ``vocab_size`` is a DataError. A smaller one is accepted (training accepts it too, e.g. a BPE
    that learned fewer merges than asked, or a padded embedding); :class:`VocabMask` keeps
    generation inside the tokenizer's ids.
    """
    step_dir = resolve_checkpoint(ckpt_path)
    cfg = _read_config(step_dir)
    dev = pick_device(cfg.train.device if device is None else device)
    model = build_model(cfg.model)
    ckpt = load_checkpoint(step_dir, model)  # verifies every file, then loads strictly
    if ckpt["config"] != cfg.to_dict():  # rewritten between the two reads, or hand-edited
        stored = RunConfig.from_dict(ckpt["config"]).to_dict() if isinstance(ckpt["config"], dict) else None
        if stored != cfg.to_dict():
            raise CheckpointError(f"checkpoint {step_dir} changed while it was being loaded; try again")
    model.to(dev).eval()
    run_dir = _run_dir_of(step_dir)
    data_dir = None
    tok_file: Path | None = None
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok_file = Path(tokenizer)
        tok = load_tokenizer(tok_file)
    else:
        data_dir = find_run_data(cfg, run_dir)
        if data_dir is not None:
            shards = TokenShards(data_dir, "val" if _has_split(data_dir, "val") else "train")
            tok = shards.load_tokenizer()
            tok_file = data_dir / shards.meta["tokenizer"]["file"]
        elif cfg.data.tokenizer == "byte":
            tok = ByteTokenizer()
        elif cfg.data.tokenizer != "bpe" and Path(cfg.data.tokenizer).is_file():
            tok_file = Path(cfg.data.tokenizer)
            tok = load_tokenizer(tok_file)
        else:
            where = f"{run_dir / 'data'}" if run_dir is not None else "the run's data/ directory"
            raise DataError(f"cannot find the tokenizer checkpoint {step_dir} was trained with: neither "
                            f"data.path={cfg.data.path!r} nor {where} is a prepared directory; "
                            "pass the tokenizer file explicitly (--tokenizer)")
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer vocab_size {tok.vocab_size} ({tok.kind}) does not fit the model's "
                        f"vocab_size {cfg.model.vocab_size} (checkpoint {step_dir})")
    info = {"path": step_dir, "step": ckpt["step"], "run_dir": run_dir, "data_dir": data_dir,
            "tokenizer_file": tok_file, "device": dev}
    return model, cfg, tok, info


def _has_split(data_dir: Path, split: str) -> bool:
    try:
        meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
        return bool(meta["shards"][split])
    except (OSError, ValueError, KeyError, TypeError):
        return True  # let TokenShards report what is wrong


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map text to the same ids (byte == byte; BPE: identical JSON)."""
    if a.kind != b.kind or a.vocab_size != b.vocab_size or a.eot_id != b.eot_id:
        return False
    if isinstance(a, ByteTokenizer):
        return True
    to_json_a, to_json_b = getattr(a, "to_json", None), getattr(b, "to_json", None)
    if to_json_a is None or to_json_b is None:
        return a == b
    return to_json_a() == to_json_b()


def check_shards(shards: TokenShards, tok: Tokenizer, vocab_size: int, described: str, checkpoint, hint: str = "") -> None:
    """Refuse token shards the checkpoint cannot read: tokenised with another tokenizer than
    ``tok`` (one DataError line naming both; ``hint`` says what to do instead) or holding ids at
    or beyond the model's ``vocab_size``."""
    data_tok = shards.load_tokenizer()
    if not same_tokenizer(data_tok, tok):
        raise DataError(f"{described} was tokenised with a different tokenizer ({data_tok.kind}, vocab "
                        f"{data_tok.vocab_size}) than checkpoint {checkpoint} ({tok.kind}, vocab "
                        f"{tok.vocab_size})" + (f"; {hint}" if hint else ""))
    shards.check_vocab(vocab_size)


class VocabMask(nn.Module):
    """Wraps a language model so that logits of ids ``>= vocab`` (embedding rows no tokenizer id
    maps to) are ``-inf``: generation never picks them. Exposes ``cfg`` and ``make_cache`` like
    the model it wraps, so :func:`hyperbit.models.generate` accepts it."""

    def __init__(self, model: nn.Module, vocab: int):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.vocab = vocab

    def make_cache(self, max_len: int | None = None):
        return self.model.make_cache(max_len)

    def forward(self, idx: Tensor, targets: Tensor | None = None, **kwargs: Any):
        logits, loss = self.model(idx, targets, **kwargs)
        return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= self.vocab,
                                  float("-inf")), loss

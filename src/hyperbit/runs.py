"""What a run directory holds, and using a trained model from it: the one place every command asks.

A run directory, as ``hyperbit train`` lays it out (:mod:`hyperbit.train.config`)::

    config.json      the resolved RunConfig (model, train, data)
    metrics.jsonl    one JSON object per logged step, evaluation and monitor
    data/            the prepared token shards (unless data.path names a prepared directory)
    checkpoints/     one step directory per checkpoint and ``latest`` (hyperbit.train.checkpoint)

:func:`load_trained` accepts a run directory, its ``checkpoints/`` directory or one
``step_XXXXXXXX`` directory, builds the model from the config stored *in the checkpoint* and loads
the weights into it (verified: sizes, sha256, shapes). The tokenizer and the data are found the way
training found its data: the prepared directory named by ``data.path``, else the run's own
``data/``; its ``meta.json`` names the tokenizer file. Nothing is unpickled. Every problem raises
:class:`CheckpointError`, :class:`DataError` or :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .config import ConfigError
from .data import ByteTokenizer, DataError, TokenShards, Tokenizer, load_tokenizer, prepare, same_tokenizer
from .data.digits import load_image_data
from .data.shards import META_FILE
from .interop.packed import is_packed_dir, load_packed, write_packed
from .interop.hf_bitnet import write_bitnet
from .interop.hf_register import write_hf
from .models import VocabMask, build_model, generate
from .train.checkpoint import CHECKPOINTS, CONFIG_FILE, load_checkpoint, resolve_checkpoint
from .train.config import METRICS_FILE, RunConfig
from .train.distributed import pick_device
from .train.errors import CheckpointError
from .train.evaluate import evaluate
from .train.precision import autocast as precision_autocast
from .train.precision import resolve_precision

__all__ = ["EXPORT_FORMATS", "check_shards", "eval_data", "evaluate_checkpoint", "export_run",
           "find_run_data", "generate_text", "load_trained", "prepared_run_data", "read_metrics", "run_dir_of"]


def run_dir_of(step_dir: Path) -> Path | None:
    """The run directory holding ``step_dir`` (``run/checkpoints/step_...``), if it is one."""
    parent = step_dir.resolve().parent
    return parent.parent if parent.name == CHECKPOINTS else None


def find_run_data(cfg: RunConfig, run_dir: Path | None) -> Path | None:
    """The prepared directory the run trained on (:meth:`RunConfig.prepared_data_dir`), or None
    when it is not there (any more)."""
    data_dir = cfg.prepared_data_dir(run_dir) if run_dir is not None else Path(cfg.data.path)
    return data_dir if (data_dir / META_FILE).exists() else None


def read_metrics(run_dir: str | Path) -> list[dict] | None:
    """The records of a run's ``metrics.jsonl``, in order; None when the file cannot be read.
    Unparsable lines (a run killed, or being written, mid-line) are skipped."""
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


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
    that learned fewer merges than asked, or a padded embedding);
    :class:`~hyperbit.models.VocabMask` keeps generation inside the tokenizer's ids.
    """
    if is_packed_dir(ckpt_path):
        return _load_packed(Path(ckpt_path), device, tokenizer)
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
    run_dir = run_dir_of(step_dir)
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


def _load_packed(path: Path, device, tokenizer) -> tuple[nn.Module, RunConfig, Tokenizer, dict[str, Any]]:
    """:func:`load_trained` for a packed directory (:mod:`hyperbit.interop.packed`): its own
    tokenizer file unless ``tokenizer`` overrides it; ``run_dir`` None."""
    tok_file = Path(tokenizer) if tokenizer is not None and not isinstance(tokenizer, Tokenizer) else None
    tok = load_tokenizer(tok_file) if tok_file is not None else tokenizer
    model, cfg, tok, header = load_packed(path, "cpu", tokenizer=tok)
    dev = pick_device(cfg.train.device if device is None else device)
    model.to(dev)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer vocab_size {tok.vocab_size} ({tok.kind}) does not fit the model's "
                        f"vocab_size {cfg.model.vocab_size} (packed model {path})")
    info = {"path": path, "step": header["step"], "run_dir": None, "data_dir": None,
            "tokenizer_file": tok_file or path / header["tokenizer"], "device": dev, "packed": True}
    return model, cfg, tok, info


# Export formats: name -> writer(model, run_config, tokenizer, info, out_dir). ``out_dir`` is an
# empty directory that exists; export_run renames it into place once the writer has returned.
EXPORT_FORMATS = {"packed": write_packed, "bitnet": write_bitnet, "hf": write_hf}


def export_run(src: str | Path, fmt: str, out: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """``hyperbit export``: write the model of ``src`` (a run dir, its checkpoints/ dir or a step
    dir, as :func:`load_trained` reads them) to the new directory ``out`` in format ``fmt``
    (a key of :data:`EXPORT_FORMATS`). ``out`` must not exist and its parent must: the writer
    fills a temporary directory beside it, renamed into place at the end, so a failure leaves
    nothing behind. Returns ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r} is not allowed; choose one of {sorted(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"output {out} already exists; export writes a new directory (remove it or pick another)")
    if not out.parent.is_dir():
        raise ConfigError(f"the parent directory of {out} does not exist")
    if is_packed_dir(src):
        raise CheckpointError(f"{src} is already a packed directory; export from a checkpoint")
    model, cfg, tok, info = load_trained(src, device="cpu", tokenizer=tokenizer)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        EXPORT_FORMATS[fmt](model, cfg, tok, info, tmp)
        os.rename(tmp, out)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or type(e).__name__}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _has_split(data_dir: Path, split: str) -> bool:
    try:
        meta = json.loads((data_dir / META_FILE).read_text(encoding="utf-8"))
        return bool(meta["shards"][split])
    except (OSError, ValueError, KeyError, TypeError):
        return True  # let TokenShards report what is wrong


def check_shards(shards: TokenShards, tok: Tokenizer, vocab_size: int, described: str, checkpoint,
                 hint: str = "") -> None:
    """Refuse token shards the checkpoint cannot read: tokenised with another tokenizer than
    ``tok`` (one DataError line naming both; ``hint`` says what to do instead) or holding ids at
    or beyond the model's ``vocab_size``."""
    data_tok = shards.load_tokenizer()
    if not same_tokenizer(data_tok, tok):
        raise DataError(f"{described} was tokenised with a different tokenizer ({data_tok.kind}, vocab "
                        f"{data_tok.vocab_size}) than checkpoint {checkpoint} ({tok.kind}, vocab "
                        f"{tok.vocab_size})" + (f"; {hint}" if hint else ""))
    shards.check_vocab(vocab_size)


def prepared_run_data(cfg: RunConfig, info: dict[str, Any], data: str | Path | None = None) -> Path:
    """The prepared directory a trained model is analysed on: ``data`` (which must be one), or the
    run's own; a DataError saying what to pass otherwise."""
    if data is not None:
        data_dir = Path(data)
        if not (data_dir / META_FILE).is_file():
            raise DataError(f"--data {data_dir} is not a prepared directory (no meta.json); "
                            "make one with `hyperbit prepare`")
        return data_dir
    data_dir = find_run_data(cfg, info["run_dir"])
    if data_dir is None:
        raise DataError(f"cannot find the data checkpoint {info['path']} was trained on (data.path="
                        f"{cfg.data.path!r}, or the run's data/ dir); pass a prepared directory with --data")
    return data_dir


@contextmanager
def eval_data(cfg: RunConfig, tok: Tokenizer, info: dict[str, Any], data: str | Path | None = None, *,
              split: str | None = None, val_fraction: float | None = None, text_field: str | None = None,
              max_bytes: int | None = None) -> Iterator[tuple[TokenShards, str, str]]:
    """``(shards, described, split)`` to evaluate a trained model on, checked against its tokenizer.

    ``data``: a prepared directory (its val split by default), or a raw corpus spec tokenised with
    ``tok`` into a temporary directory and evaluated whole (or its val split with ``val_fraction``).
    Without ``data``: the run's own val split, re-tokenised from the run's corpus when its prepared
    directory is gone. The temporary directory lives as long as the context."""
    with tempfile.TemporaryDirectory(prefix="hyperbit-eval-") as tmp:
        prepared = data is not None and (Path(data) / META_FILE).is_file()
        if data is None and (data_dir := find_run_data(cfg, info["run_dir"])) is not None:
            described, split = str(data_dir), split or "val"
        elif prepared:
            data_dir, described, split = Path(data), str(data), split or "val"
        else:  # a raw corpus: tokenised with the checkpoint's tokenizer into a temporary directory
            own = data is None  # the run's prepared data is gone: re-tokenise its corpus
            spec = cfg.data.path if own else data
            fraction = cfg.data.val_fraction if own else (0.0 if val_fraction is None else val_fraction)
            meta = _prepare(spec, tmp, tok, fraction, (cfg.data.max_bytes or None) if own else max_bytes,
                            text_field or (cfg.data.text_field if own else None),
                            cfg.data.decode_errors if own else "strict")
            data_dir, described = Path(tmp), str(spec)
            whole = meta["val_fraction"] == 0.0  # no validation split asked for: the whole corpus
            split = split or ("train" if whole else "val")
            if whole and split == "val":
                raise ConfigError("--split val needs --val-fraction > 0 for a raw corpus "
                                  "(without it the whole corpus is evaluated)")
        shards = TokenShards(data_dir, split)
        check_shards(shards, tok, cfg.model.vocab_size, described, info["path"],
                     hint="pass a raw corpus instead to tokenise it with the right one")
        try:
            yield shards, described, split
        finally:
            del shards  # release the memory maps before the temporary directory goes


def _prepare(spec, out, tok, val_fraction, max_bytes, text_field, decode_errors) -> dict:
    try:
        return prepare(spec, out, tokenizer=tok, val_fraction=val_fraction, max_bytes=max_bytes,
                       text_field=text_field, decode_errors=decode_errors)
    except OSError as e:
        raise DataError.from_os_error(e) from None


def evaluate_checkpoint(checkpoint: str | Path, *, data: str | Path | None = None, split: str | None = None,
                        batches: int | None = None, batch_size: int | None = None, seq: int | None = None,
                        precision: str | None = None, device: str | None = None,
                        tokenizer: str | Path | None = None, **data_options: Any) -> dict[str, Any]:
    """``hyperbit eval``: the validation loss and bits per byte of a checkpoint, as a dict.

    Defaults come from the run: ``train.seq_len``, its micro-batch and ``train.eval_batches``
    (0 = the whole split); the precision is ``auto`` (bf16 where this device computes it natively,
    else fp32; :mod:`hyperbit.train.precision`); the data from :func:`eval_data`
    (``data_options``: ``val_fraction``, ``text_field``, ``max_bytes`` for a raw corpus)."""
    model, cfg, tok, info = load_trained(checkpoint, device=device, tokenizer=tokenizer)
    t = cfg.train
    seq = t.seq_len if seq is None else seq
    batch = t.batch_size // t.grad_accum if batch_size is None else batch_size
    batches = t.eval_batches if batches is None else batches
    if not 1 <= seq <= cfg.model.max_seq_len:
        raise ConfigError(f"--seq must be in [1, {cfg.model.max_seq_len}] (the model's max_seq_len), got {seq}")
    if batch < 1 or batches < 0:
        raise ConfigError("--batch-size must be >= 1 and --batches >= 0 (0 = the whole split)")
    dev = info["device"]
    precision = resolve_precision(precision or "auto", dev)
    autocast = precision_autocast(precision, dev)
    if cfg.model.arch == "vit":  # an image classifier: loss and accuracy on its test images
        described = cfg.data.path if data is None else str(data)
        _, test = load_image_data(described)
        result = evaluate(model, test, seq, batch, batches or None, dev, autocast)
        return {"checkpoint": str(info["path"]), "step": info["step"], "data": described, "split": "test",
                "batches": 0, "batch_size": batch, "images": len(test),
                "precision": precision, "device": str(dev), **result}
    with eval_data(cfg, tok, info, data, split=split, **data_options) as (shards, described, split):
        result = evaluate(model, shards, seq, batch, batches or None, dev, autocast)
        windows = shards.num_eval_windows(seq)
    windows = min(windows, batches * batch) if batches else windows
    return {"checkpoint": str(info["path"]), "step": info["step"], "data": described, "split": split,
            "batches": batches, "batch_size": batch, "seq_len": seq, "tokens": windows * seq,
            "precision": precision, "device": str(dev), **result}


def generate_text(model: nn.Module, tok: Tokenizer, prompt: str, max_new_tokens: int, *,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                  seed: int = 0, use_cache: bool = True, precision: str = "auto") -> tuple[str, int, int]:
    """``hyperbit generate``: ``prompt`` continued by ``max_new_tokens`` tokens (fewer only when the
    model ends the document: generation stops at the end-of-text token); the number of new tokens
    in it; and the prompt's length in tokens. Past the model's context (``max_seq_len``) the model
    reads a sliding window of the last tokens (:mod:`hyperbit.models.generate`), so there is no
    length limit; a prompt longer than the context is read from its last ``max_seq_len`` tokens.
    An empty prompt starts a new document (the end-of-text token). ``precision`` follows the
    training rule (``auto``: bf16 autocast where the device computes it natively, else fp32).
    Bad arguments are one-line ConfigErrors."""
    if getattr(getattr(model, "cfg", None), "arch", "lm") != "lm":
        raise ConfigError("this checkpoint is a vision transformer (model.arch=vit): it classifies "
                          "images and does not generate text; use `hyperbit eval`")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0, got {max_new_tokens}")
    ids = tok.encode(prompt)
    if not ids:  # an empty prompt: start a new document
        if tok.eot_id is None:
            raise ConfigError(f"the prompt is empty and the {tok.kind} tokenizer has no end-of-text "
                              "token to start from; give a --prompt")
        ids = [tok.eot_id]
    runner = VocabMask(model, tok.vocab_size) if tok.vocab_size < model.cfg.vocab_size else model
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        with precision_autocast(resolve_precision(precision, device), device):
            out = generate(runner, torch.tensor([ids], dtype=torch.long), max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                           use_cache=use_cache, stop_token=tok.eot_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    new = out[0, len(ids):].tolist()
    while new and tok.eot_id is not None and new[-1] == tok.eot_id:
        new.pop()  # generation stops at the end of a document
    return prompt + tok.decode(new), len(new), len(ids)

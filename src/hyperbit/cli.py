"""``hyperbit <command>``: model inspection from the command line.

    hyperbit config [--preset NAME] [key=value ...]   print the resolved model config as JSON
    hyperbit params [--preset NAME] [key=value ...]   parameter counts (built on the meta device)
    hyperbit wiring [--preset NAME] [key=value ...]   build the model and run the wiring check
    hyperbit train [--preset NAME] [--out DIR] [--resume] [--overwrite] [--dry-run]
                   [section.key=value ...]             train (model.*, train.*, data.* overrides)
    hyperbit prepare SOURCE OUT_DIR [--tokenizer byte|bpe|FILE] [--vocab-size N] [--val-fraction F]
                   [--text-field NAME] [--max-bytes N] [--overwrite]   tokenise a corpus into shards
    hyperbit eval CKPT [--data SPEC|PREPARED_DIR] [--batches N] [--seq N] [--json]
                                                       validation loss and bits/byte of a checkpoint
    hyperbit generate CKPT --prompt TEXT [--max-tokens N] [--temperature T] [--top-k K]
                   [--top-p P] [--seed S] [--no-cache] continue a prompt with a trained model
    hyperbit compare [--preset NAME] [--out DIR] [--arms A,B,...] [--seeds N|LIST] [--axis K=V1,V2]
                   [--tokens N] [--baseline ARM] [--report-only] [section.key=value ...]
                                                       train a grid of runs, then write a report
    hyperbit inspect CKPT [--out DIR] [--data DIR] [--batch-size N] [--seq N] [--json]
                                                       plots + JSON: connection matrix, collapse, gain

CKPT is a run directory (its latest checkpoint), its checkpoints/ directory or one step directory.

Bad input (configs, paths, data, checkpoints) ends in one line on stderr and exit code 2; a run
stopped by a non-finite loss exits with 3 and keeps its last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, ConfigError, ModelConfig, parse_overrides, preset


def _config(args: argparse.Namespace) -> ModelConfig:
    cfg = preset(args.preset) if args.preset else ModelConfig()
    return parse_overrides(cfg, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).to_dict(), indent=2))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .models import build_model, count_params, pathway_params

    cfg = _config(args)
    model = build_model(cfg, device="meta")
    total = model.num_params()
    print(f"pathway {cfg.pathway} (n={cfg.streams}), linear {cfg.linear}: {total:,} parameters "
          f"({model.num_params(exclude_embeddings=True):,} without the embedding)")
    print(f"  analytic count {count_params(cfg):,}; connection parameters per branch "
          f"{pathway_params(cfg):,} x {cfg.n_branches} branches")
    return 0 if total == count_params(cfg) else 1


def cmd_wiring(args: argparse.Namespace) -> int:
    import torch

    from .diagnostics import check_wiring
    from .models import build_model

    torch.manual_seed(0)
    report = check_wiring(build_model(_config(args)))
    print(report)
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import resolve_run_config
    from .train.loop import train

    bare_resume = args.resume and not args.preset and not args.overrides
    cfg = None if bare_resume else resolve_run_config(args.preset, args.overrides)
    if args.dry_run:
        if cfg is None:
            raise ConfigError("--dry-run needs a preset or overrides (a bare --resume uses the run's config)")
        print(cfg.to_json())
        return 0
    out = args.out or f"runs/{args.preset or 'default'}"  # --resume alone: the run's own config
    result = train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if "val_bpb" in result:
        print(f"done: step {result['step']}, train loss {result['loss']:.4f}, "
              f"val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte -> {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    try:
        meta = prepare(args.source, args.out_dir, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       val_fraction=args.val_fraction, max_bytes=args.max_bytes, overwrite=args.overwrite,
                       text_field=args.text_field, sample_by=args.sample_by, pattern=args.pattern)
    except OSError as e:
        raise _os_error(e) from None
    tok, vocab, docs, tokens = meta["tokenizer"], meta["vocab_size"], meta["documents"], meta["tokens"]
    print(f"prepared {args.out_dir}: train {tokens['train']:,} tokens ({docs['train']:,} documents), "
          f"val {tokens['val']:,} tokens ({docs['val']:,} documents); {tok['kind']} tokenizer, "
          f"vocab {vocab:,}, {meta['dtype']} shards")
    print(f"train on it: hyperbit train data.path={args.out_dir} model.vocab_size={vocab}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import tempfile
    from contextlib import nullcontext
    from pathlib import Path

    import torch

    from .data import TokenShards, prepare
    from .train.inference import check_shards, find_run_data, load_trained
    from .train.loop import evaluate

    model, cfg, tok, info = load_trained(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    t = cfg.train
    seq = t.seq_len if args.seq is None else args.seq
    batch = t.batch_size // t.grad_accum if args.batch_size is None else args.batch_size
    batches = t.eval_batches if args.batches is None else args.batches
    precision = args.precision or t.precision
    if not 1 <= seq <= cfg.model.max_seq_len:
        raise ConfigError(f"--seq must be in [1, {cfg.model.max_seq_len}] (the model's max_seq_len), got {seq}")
    if batch < 1 or batches < 0:
        raise ConfigError("--batch-size must be >= 1 and --batches >= 0 (0 = the whole split)")
    device = info["device"]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    with tempfile.TemporaryDirectory(prefix="hyperbit-eval-") as tmp:
        prepared = args.data is not None and (Path(args.data) / "meta.json").is_file()
        if args.data is None and (data_dir := find_run_data(cfg, info["run_dir"])) is not None:
            described, split = str(data_dir), args.split or "val"
        elif prepared:
            data_dir, described, split = Path(args.data), str(args.data), args.split or "val"
        else:  # a raw corpus: tokenised with the checkpoint's tokenizer into a temporary directory
            own = args.data is None  # the run's prepared data is gone: re-tokenise its corpus
            spec = cfg.data.path if own else args.data
            val_fraction = (cfg.data.val_fraction if own else
                            (0.0 if args.val_fraction is None else args.val_fraction))
            max_bytes = (cfg.data.max_bytes or None) if own else args.max_bytes
            try:
                meta = prepare(spec, tmp, tokenizer=tok, val_fraction=val_fraction, max_bytes=max_bytes,
                               text_field=args.text_field or (cfg.data.text_field if own else None))
            except OSError as e:
                raise _os_error(e) from None
            data_dir, described = Path(tmp), str(spec)
            whole = meta["val_fraction"] == 0.0  # no validation split asked for: the whole corpus
            split = args.split or ("train" if whole else "val")
            if whole and split == "val":
                raise ConfigError("--split val needs --val-fraction > 0 for a raw corpus "
                                  "(without it the whole corpus is evaluated)")
        shards = TokenShards(data_dir, split)
        check_shards(shards, tok, cfg.model.vocab_size, described, info["path"],
                     hint="pass a raw corpus instead to tokenise it with the right one")
        result = evaluate(model, shards, seq, batch, batches or None, device, autocast)
        windows = shards.num_eval_windows(seq)
        windows = min(windows, batches * batch) if batches else windows
        del shards
    report = {"checkpoint": str(info["path"]), "step": info["step"], "data": described, "split": split,
              "batches": batches, "batch_size": batch, "seq_len": seq, "tokens": windows * seq,
              "precision": precision, "device": str(device), **result}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"step {info['step']} on {described} ({split} split, {windows * seq:,} tokens): "
              f"{'val loss' if split == 'val' else 'loss'} {result['val_loss']:.4f}, "
              f"{result['val_bpb']:.4f} bits/byte  [{info['path']}]")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .models import generate
    from .train.inference import VocabMask, load_trained

    if args.max_tokens < 0:
        raise ConfigError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    model, cfg, tok, info = load_trained(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    ids = tok.encode(args.prompt)
    primed = not ids
    if primed:  # an empty prompt: start a new document
        if tok.eot_id is None:
            raise ConfigError(f"the prompt is empty and the {tok.kind} tokenizer has no end-of-text "
                              "token to start from; give a --prompt")
        ids = [tok.eot_id]
    limit = cfg.model.max_seq_len
    room = limit - len(ids)
    if room < 0 or (room == 0 and args.max_tokens > 0):
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model's max_seq_len is {limit}, which "
                          "leaves no room to generate: shorten the prompt")
    n = min(args.max_tokens, room)
    runner = VocabMask(model, tok.vocab_size) if tok.vocab_size < cfg.model.vocab_size else model
    generator = torch.Generator(device=info["device"]).manual_seed(args.seed)
    try:
        out = generate(runner, torch.tensor([ids], dtype=torch.long), n, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None,
                       generator=generator, use_cache=not args.no_cache, stop_token=tok.eot_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if n < args.max_tokens:
        print(f"hyperbit: note: generated at most {n} tokens, not {args.max_tokens}: the prompt is "
              f"{len(ids)} tokens and the model's max_seq_len is {limit}", file=sys.stderr)
    new = out[0, len(ids):].tolist()
    while new and tok.eot_id is not None and new[-1] == tok.eot_id:
        new.pop()  # generation stops at the end of a document
    print(args.prompt + tok.decode(new))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    from .compare.grid import compare, parse_axis, parse_seeds

    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {args.tokens}")
    report = compare(args.preset, args.overrides, [a.strip() for a in args.arms.split(",") if a.strip()],
                     [parse_axis(a) for a in args.axis], parse_seeds(args.seeds),
                     tokens=int(args.tokens) if args.tokens else None, out=args.out, baseline=args.baseline,
                     report_only=args.report_only, dry_run=args.dry_run,
                     command="hyperbit compare " + shlex.join(args.argv))
    if report is not None:
        print(f"report: {report}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .diagnostics.inspect import cmd_inspect as run

    return run(args)


def _os_error(e: OSError):
    from .data import DataError

    where = f" {e.filename}" if e.filename else ""
    return DataError(f"cannot access{where}: {e.strerror or e}")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="run dir, its checkpoints/ dir or a step dir")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer file (default: the one the run was trained with)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="default: the run's train.device (auto = CUDA when available)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("config", cmd_config, "print the resolved model config"),
                            ("params", cmd_params, "count parameters"),
                            ("wiring", cmd_wiring, "run the wiring check")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
        p.set_defaults(fn=fn)
    from .train.config import RUN_PRESETS

    p = sub.add_parser("train", help="train a model (resumable)")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="start from a named run preset")
    p.add_argument("--out", help="run directory (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="e.g. model.pathway=hc model.expansion_rate=4 train.lr=3e-3 data.path=corpus/")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("prepare", help="tokenise a corpus once into token shards")
    p.add_argument("source", help="pystdlib, a text file, a dir, a glob, a .jsonl file or a HF dataset dir "
                                  "(or kind:PATH)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE",
                   help="byte (default), bpe (trained here on the train split) or a saved tokenizer file")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents for validation (default 0.01; pystdlib has its own split)")
    p.add_argument("--text-field", help="JSON Lines / HF dataset text field (default text)")
    p.add_argument("--sample-by", choices=("document", "paragraph", "line"),
                   help="text/dir/glob: what one document is")
    p.add_argument("--pattern", help="dir: which files (default **/*.txt)")
    p.add_argument("--max-bytes", type=int, help="stop reading the corpus after about this many bytes")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("eval", help="validation loss and bits/byte of a checkpoint")
    _checkpoint_args(p)
    p.add_argument("--data", metavar="SPEC|DIR",
                   help="a prepared dir (its val split), or a raw corpus spec tokenised with the "
                        "checkpoint's tokenizer into a temporary dir and evaluated whole (or its val "
                        "split with --val-fraction F); default: the run's own val split")
    p.add_argument("--split", choices=("train", "val"), help="which split to evaluate")
    p.add_argument("--val-fraction", type=float, help="raw corpus: hold out this fraction, evaluate it")
    p.add_argument("--text-field", help="raw JSON Lines / HF corpus: the text field")
    p.add_argument("--max-bytes", type=int, help="raw corpus: read about this many bytes")
    p.add_argument("--batches", type=int,
                   help="batches to evaluate (default: the run's train.eval_batches; 0 = the whole split)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: the run's micro-batch)")
    p.add_argument("--seq", type=int, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: the run's train.precision")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    _checkpoint_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=200,
                   help="new tokens (default 200; fewer if the model's max_seq_len is reached)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely (0 = off; default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off; default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every step (slow)")
    p.set_defaults(fn=cmd_generate)

    from .compare.grid import DEFAULT_ARMS

    p = sub.add_parser("compare", help="train a grid of pathways x seeds, then report (resumable)")
    p.add_argument("--preset", choices=sorted(RUN_PRESETS), help="run preset every run starts from")
    p.add_argument("--out", help="grid directory (default runs/compare-<preset>)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help="pathways: prenorm, postnorm, shcN, dhcN, sequential, parallelN "
                        f"(default {','.join(DEFAULT_ARMS)})")
    p.add_argument("--seeds", default="3", help="a count (3 = seeds 0,1,2) or a list 0,5,7 (default 3)")
    p.add_argument("--axis", action="append", default=[], metavar="section.key=V1,V2",
                   help="another grid axis, e.g. --axis train.lr=1e-3,3e-3 (repeatable)")
    p.add_argument("--tokens", type=float,
                   help="training tokens per run (default: the preset's steps x batch x seq)")
    p.add_argument("--baseline", help="the arm differences are measured against (default: the first)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report on the runs so far")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("inspect", help="what a checkpoint's pathway learned: plots and a JSON summary")
    _checkpoint_args(p)
    p.add_argument("--out", metavar="DIR",
                   help="report directory (default: <run>/inspect/step-<N>)")
    p.add_argument("--data", metavar="DIR",
                   help="a prepared dir whose val split to read (default: the run's own data)")
    p.add_argument("--batch-size", type=int, default=8, help="validation windows to analyse (default 8)")
    p.add_argument("--seq", type=int, help="tokens per window (default: the run's train.seq_len)")
    p.add_argument("--json", action="store_true", help="print the JSON summary to stdout")
    p.set_defaults(fn=cmd_inspect)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    from .data import DataError
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingStopped

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"hyperbit: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"hyperbit: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("hyperbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

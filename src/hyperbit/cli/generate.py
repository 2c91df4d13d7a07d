"""``hyperbit generate``: continue a prompt with a trained model."""

from __future__ import annotations

import argparse
import sys

from ..runs import generate_text, load_trained
from ..train.precision import PRECISIONS
from .common import checkpoint_args


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    checkpoint_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=200,
                   help="new tokens (default 200; fewer only if the model ends the document); past "
                        "the model's max_seq_len it reads a sliding window of the last tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely (0 = off; default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off; default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole window every step (slow)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default auto: bf16 where this device computes it natively, else fp32")
    p.set_defaults(fn=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    model, cfg, tok, info = load_trained(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    text, _, prompt_tokens = generate_text(
        model, tok, args.prompt, args.max_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1.0 else None, seed=args.seed,
        use_cache=not args.no_cache, precision=args.precision or "auto")
    context = cfg.model.max_seq_len
    if prompt_tokens > context:
        print(f"hyperbit: note: the prompt is {prompt_tokens} tokens and the model's max_seq_len is "
              f"{context}: it reads only the prompt's last {context} tokens", file=sys.stderr)
    print(text)
    return 0

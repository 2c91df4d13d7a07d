"""Training throughput of a mixture-of-experts LM against a dense LM with the same active parameters.

Claim: the MoE FFN's routing and batched dispatch cost little: a MoE LM (E experts of width h,
top-k) trains at >= 0.7x the tokens/s of the dense LM whose FFN has width k * h (the same active
parameter count, up to the router's d * E per layer), on CPU.

Three models of one shape (the same attention, embedding and batch), each a full training step
(forward + backward + AdamW step, under the precision ``hyperbit train`` picks on this machine):

    dense      ``ffn="swiglu"``, ``ffn_hidden = k * h``
    moe        ``ffn="moe"``, E experts of width h, top-k (hyperbit's dispatch: a stable sort,
               the tokens gathered into rows grouped by expert, one ``torch.mm`` per expert and
               projection, row counts bucketed so that oneDNN's compiled kernels are reused)
    moe-loop   the same MoE weights and routing, each layer's experts run one after the other
               (plain PyTorch, written here: ``nonzero`` per expert, ``F.linear``, ``index_add_``):
               the common readable implementation, as a reference for hyperbit's

Timed round-robin in one process (``_common.interleaved_timing``: the starting model rotates every
round); medians over all timed steps; tokens/s = batch * seq_len / median step.

    python benchmarks/moe_throughput.py          # d 256, 4 blocks, E 8, top-2, h 256; 16 x 128 tokens
    python benchmarks/moe_throughput.py --quick  # tiny, smoke test
    python benchmarks/moe_throughput.py --experts 16 --top-k 4 --expert-hidden 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.setup_paths()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hyperbit import ModelConfig  # noqa: E402
from hyperbit.models import TransformerLM, count_params  # noqa: E402
from hyperbit.nn.moe import MoEFeedForward, balance_loss, route, z_loss  # noqa: E402
from hyperbit.train import param_groups  # noqa: E402

TARGET = 0.7
NAMES = ("dense", "moe", "moe-loop")
FULL = dict(dim=256, n_layers=4, n_heads=4, experts=8, top_k=2, expert_hidden=256, batch=16, seq_len=128,
            rounds=5, steps=4, warmup=2)
QUICK = dict(dim=32, n_layers=2, n_heads=4, experts=4, top_k=2, expert_hidden=32, batch=2, seq_len=32,
             rounds=2, steps=2, warmup=1)
DEFAULT_OUT = C.RESULTS_DIR / "moe_throughput.json"
DEFAULT_OUT_QUICK = C.RESULTS_DIR / "moe_throughput_quick.json"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke test")
    for key in FULL:
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                        help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: what `hyperbit train` picks here (bf16 where native, else fp32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path (default {DEFAULT_OUT.relative_to(C.REPO_ROOT)}, "
                         f"{DEFAULT_OUT_QUICK.relative_to(C.REPO_ROOT)} with --quick)")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.top_k > args.experts:
        ap.error(f"--top-k {args.top_k} must be <= --experts {args.experts}")
    if args.precision == "auto":
        args.precision = C.precision("cpu")
    return args


def model_config(name: str, args) -> ModelConfig:
    shape = dict(vocab_size=256, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                 max_seq_len=args.seq_len)
    if name == "dense":
        return ModelConfig(**shape, ffn="swiglu", ffn_hidden=args.top_k * args.expert_hidden)
    return ModelConfig(**shape, ffn="moe", ffn_hidden=args.expert_hidden, moe_experts=args.experts,
                       moe_top_k=args.top_k)


def loop_forward(self: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The same MoE layer, experts one after the other (plain PyTorch; fp, no capacity)."""
    shape = x.shape
    x = x.reshape(-1, self.dim)  # (N, d)
    logits = self.router(x)
    probs, weights, chosen = route(logits, self.top_k)
    y = torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
    out_dtype = x.dtype
    experts = zip(self.gate_proj.weight.unbind(0), self.up_proj.weight.unbind(0),
                  self.down_proj.weight.unbind(0))
    for e, (gate, up, down) in enumerate(experts):
        token, choice = (chosen == e).nonzero(as_tuple=True)
        xe = x[token]
        out = F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down)  # (n_e, d)
        out_dtype = out.dtype
        y.index_add_(0, token, out.float() * weights[token, choice].unsqueeze(-1))
    load = torch.bincount(chosen.reshape(-1), minlength=self.experts)
    self.aux = {"balance": balance_loss(probs, load), "z": z_loss(logits),
                "dropped": load.new_zeros(()), "assignments": chosen.numel()}
    return y.to(out_dtype).reshape(shape)


def build(name: str, args) -> TransformerLM:
    torch.manual_seed(0)  # every model from the same seed: moe and moe-loop share their weights
    model = TransformerLM(model_config(name, args))
    if name == "moe-loop":
        for block in model.blocks:
            block.ffn.forward = loop_forward.__get__(block.ffn)
    model.bench_name = name
    return model


def make_batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = C.machine_info("cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    idx, targets = make_batch(args)
    tokens = args.batch * args.seq_len
    models, steps = {}, {}
    for name in NAMES:
        model = models[name] = build(name, args)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        steps[name] = C.make_train_step(model, opt, idx, targets, "cpu", dtype)
    with torch.no_grad():  # the loop reference computes what the batched dispatch computes
        check = {name: models[name](idx, targets)[1].item() for name in ("moe", "moe-loop")}
    print(f"moe_throughput: d {args.dim}, {args.n_layers} blocks, {args.experts} experts of width "
          f"{args.expert_hidden}, top-{args.top_k} vs dense width {args.top_k * args.expert_hidden}; "
          f"batch {args.batch} x seq {args.seq_len}, {args.precision}, {torch.get_num_threads()} threads"
          + (" [quick]" if args.quick else ""), file=sys.stderr, flush=True)
    C.warmup(steps, args.warmup)
    times = C.interleaved_timing(steps, args.rounds, args.steps)

    results = {}
    for name in NAMES:
        flat = [s for r in times[name] for s in r]
        step_s = C.median(flat)
        cfg = models[name].cfg
        results[name] = {"model_config": cfg.to_dict(), "params": count_params(cfg),
                         "active_params": count_params(cfg, active=True),
                         "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s if step_s > 0 else None,
                         "step_ms_per_round": [[s * 1e3 for s in r] for r in times[name]],
                         "step_ms_summary": C.summarize(s * 1e3 for s in flat)}
    dense = results["dense"]
    for r in results.values():
        r["ratio_vs_dense"] = C.ratio(r["tokens_per_s"], dense["tokens_per_s"])
    ratio = results["moe"]["ratio_vs_dense"]
    targets_ = [{"name": "moe_tokens_per_s", "threshold": TARGET, "ratio": ratio,
                 "description": f"MoE LM tokens/s >= {TARGET}x the dense LM of the same active parameters",
                 "passed": None if ratio is None else bool(ratio >= TARGET)}]
    if args.quick:
        targets_[0]["note"] = "quick mode: tiny model, not representative"
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    info["source_digest_end"] = C.source_digest()
    info["source_changed_during_run"] = info["source_digest_end"] != info["source_digest"]

    print(f"\nMoE vs dense training throughput, {tokens} tokens/step, {args.precision}, "
          f"{torch.get_num_threads()} threads, cpu ({info['cpu_model']}); {args.rounds} rounds x "
          f"{args.steps} steps, medians" + ("  [QUICK]" if args.quick else ""))
    headers = ["model", "params", "active", "step ms", "p25 ms", "p75 ms", "tokens/s", "x dense"]
    rows = [[name, f"{r['params']:,}", f"{r['active_params']:,}", C.fmt(r["step_ms"]),
             C.fmt(r["step_ms_summary"]["p25"]), C.fmt(r["step_ms_summary"]["p75"]),
             C.fmt(r["tokens_per_s"], ",.0f"), C.fmt(r["ratio_vs_dense"], ".3f")]
            for name, r in results.items()]
    print(C.format_table(headers, rows))
    print(f"moe and moe-loop compute the same loss: {check['moe']:.6f} vs {check['moe-loop']:.6f}")
    settings = {key: getattr(args, key) for key in FULL}
    settings.update(quick=args.quick, precision=args.precision, threads=torch.get_num_threads(),
                    threads_flag=args.threads, tokens_per_step=tokens, target_ratio=TARGET)
    out = args.out or (DEFAULT_OUT_QUICK if args.quick else DEFAULT_OUT)
    C.finish("moe_throughput", info, targets_, out, quick=args.quick,
             source_changed=info["source_changed_during_run"], settings=settings, models=results,
             loss_check=check)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Greedy decoding speed and memory of a ~100M-parameter BitNet model: packed vs dense vs BitLinear.

Claim: greedy decoding with the KV cache runs at least 2.5x the tokens/s of the same model held as
dense fp32 weights, and its linear weights take 1/16 of the fp32 bytes on disk.

Model (default): ``linear=bitnet`` (SubLN), d 768, 14 blocks, 12 heads, SwiGLU 2048, byte
vocabulary (256, untied head), Pre-Norm: 99.1M linear weights, 99.5M parameters in all. A byte
vocabulary keeps the (full-precision) embedding and head small, so the linear layers are what
is measured. The weights are random BitLinear weights; the same ternary model in four forms:

* ``packed``: every BitLinear swapped for ``PackedBitLinear`` (``interop.packed.pack_modules``),
  its default kernel (``torch._int_mm`` on the unpacked int8 codes); ``packed oneDNN`` the same
  with the opt-in oneDNN prepacked int8 kernel (where available);
* ``fp32 dense``: ``linear=fp`` with each weight set to its dequantised ternary value
  ``W_q * gamma`` (what a plain PyTorch model of the trained network is), activations not
  quantised;
* ``bf16 dense``: the same cast to bf16 (only where the CPU computes bf16 natively);
* ``BitLinear``: the training form in eval mode, which re-quantises its latent fp32 weights on
  every token.

Each timed call is ``hyperbit.models.generate`` (greedy, KV cache) of ``--tokens`` new tokens
after an 8-token prompt (the prefill is included; it is one forward of 8 tokens); the BitLinear
form, which is 10-100x slower, generates ``--bitlinear-tokens``. Configurations
are timed round-robin (``_common.interleaved_timing``), medians over rounds; inference mode.
A second column divides by the process's CPU time instead of wall time (``time.process_time``):
on a shared machine it is not inflated by other processes; with ``--threads 1`` it is the
single-core cost. Memory: bytes of the linear weights as stored (``state_dict``) and as held at run time (for the
packed model: the int8 / prepacked kernel weight cached on the first call, 1 byte per weight), and
all parameters + buffers + kernel caches. ``--quick``: a tiny model, a few tokens, one round.

    python benchmarks/decode.py [--tokens 32] [--bitlinear-tokens 4] [--rounds 3] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, finish, fmt, format_table, interleaved_timing, machine_info,  # noqa: E402
                     median, setup_paths, source_digest, warmup)

setup_paths()

SHAPE = dict(vocab_size=256, dim=768, n_layers=14, n_heads=12, ffn_hidden=2048, max_seq_len=256)
QUICK_SHAPE = dict(vocab_size=256, dim=128, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=64)
TARGET = 2.5
PROMPT = 8


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory(model, linear_types) -> dict[str, int]:
    """Stored and run-time bytes of the linear weights, and of everything the model holds."""
    from hyperbit.nn import PackedBitLinear

    linears = [m for m in model.modules() if isinstance(m, linear_types) and m is not getattr(model, "head", None)]
    stored = runtime = cache = 0
    for m in linears:
        if isinstance(m, PackedBitLinear):
            stored += _bytes([m.packed, m.weight_scale])
            held = m.in_features * m.out_features  # int8 codes or the prepacked int8 weight
            runtime += held
            cache += held
        else:
            stored += _bytes([m.weight])
            runtime += _bytes([m.weight])
    cached = {id(m.codes) for m in linears if isinstance(m, PackedBitLinear) and m.codes is not None}
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in cached}
    return {"linear_stored_bytes": stored, "linear_runtime_bytes": runtime,
            "total_bytes": _bytes(seen.values()) + cache}


def build(quick: bool):
    """The four forms of one random BitNet model: ``{name: model}`` and the linear count."""
    import copy

    import torch

    from hyperbit.config import ModelConfig
    from hyperbit.interop.packed import pack_modules
    from hyperbit.models import build_model
    from hyperbit.nn import BitLinear, PackedBitLinear
    from hyperbit.nn.bitlinear import quantize_weight
    from hyperbit.nn.packed import onednn_available
    from hyperbit.train.precision import native_bf16

    shape = QUICK_SHAPE if quick else SHAPE
    torch.manual_seed(0)
    bit = build_model(ModelConfig.from_dict({**shape, "linear": "bitnet"})).eval()
    dense = build_model(ModelConfig.from_dict({**shape, "linear": "fp", "subln": True})).eval()
    with torch.no_grad():
        state = dict(bit.state_dict())
        for name, m in bit.named_modules():
            if isinstance(m, BitLinear):
                codes, gamma = quantize_weight(m.weight)
                state[f"{name}.weight"] = codes * gamma  # the dequantised ternary weight
        dense.load_state_dict(state)
    packed = pack_modules(copy.deepcopy(bit))
    models = {"packed": packed, "fp32 dense": dense, "BitLinear": bit}
    if onednn_available():
        models["packed oneDNN"] = onednn = pack_modules(copy.deepcopy(bit))
        for m in onednn.modules():
            if isinstance(m, PackedBitLinear):
                m.use_onednn = True
    if native_bf16("cpu"):
        models["bf16 dense"] = copy.deepcopy(dense).to(torch.bfloat16)
    return models, sum(isinstance(m, BitLinear) for m in bit.modules())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per timed call")
    ap.add_argument("--bitlinear-tokens", type=int, default=4,
                    help="new tokens per timed call of the BitLinear form (it re-quantises every weight per token)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 tokens, 1 round (for tests)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "decode.json")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.bitlinear_tokens, args.rounds = min(args.tokens, 8), min(args.bitlinear_tokens, 4), 1

    import torch

    from hyperbit.models import generate
    from hyperbit.nn import PackedBitLinear

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    digest = source_digest()
    models, n_linears = build(args.quick)
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    outputs: dict[str, torch.Tensor] = {}

    new_tokens = {name: args.bitlinear_tokens if name == "BitLinear" else args.tokens for name in models}

    cpu_times: dict[str, list[float]] = {name: [] for name in models}

    def runner(name, model):
        def step() -> None:
            t0 = time.process_time()
            outputs[name] = generate(model, prompt, new_tokens[name], temperature=0.0)
            cpu_times[name].append(time.process_time() - t0)
        return step

    fns = {name: runner(name, m) for name, m in models.items()}
    with torch.inference_mode():
        warmup(fns, 0 if args.quick else 1)
        times = interleaved_timing(fns, args.rounds, 1)
    tok_s = {name: new_tokens[name] / median([s for r in ts for s in r]) for name, ts in times.items()}
    # CPU seconds of this process per call (timed calls only): unlike wall time, not inflated by
    # other processes taking the cores; with one thread it is the single-core decode cost
    cpu_tok_s = {name: new_tokens[name] / median(ts[-args.rounds:]) for name, ts in cpu_times.items()}
    mem = {name: memory(m, (torch.nn.Linear, PackedBitLinear)) for name, m in models.items()}
    n_same = PROMPT + args.bitlinear_tokens
    same = {name: float((outputs[name][:, :n_same] == outputs["BitLinear"]).float().mean()) for name in models}

    fp32 = tok_s["fp32 dense"]
    rows = [[name, fmt(tok_s[name], ".1f"), fmt(tok_s[name] / fp32, ".2f", "x"), fmt(cpu_tok_s[name], ".1f"),
             fmt(cpu_tok_s[name] / cpu_tok_s["fp32 dense"], ".2f", "x"),
             f"{mem[name]['linear_stored_bytes'] / 2**20:,.1f}", f"{mem[name]['linear_runtime_bytes'] / 2**20:,.1f}",
             f"{mem[name]['total_bytes'] / 2**20:,.1f}", fmt(same[name], ".3f")] for name in models]
    n_params = sum(p.numel() for p in models["BitLinear"].parameters())
    print(f"greedy decode, KV cache, {args.tokens} new tokens ({args.bitlinear_tokens} for BitLinear) after {PROMPT}, CPU, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds, medians; model {QUICK_SHAPE if args.quick else SHAPE}, "
          f"{n_params / 1e6:.1f}M parameters, {n_linears} BitLinear")
    print(format_table(["form", "tokens/s", "vs fp32", "CPU-time tokens/s", "vs fp32", "linear MiB stored", "linear MiB held", "total MiB",
                        f"same first {n_same} tokens as BitLinear"], rows))
    ratio = tok_s["packed"] / fp32
    packed_bytes, dense_bytes = mem["packed"]["linear_stored_bytes"], mem["fp32 dense"]["linear_stored_bytes"]
    targets = [{"description": f"packed decode >= {TARGET}x fp32 dense tokens/s", "ratio": ratio,
                "target": TARGET, "passed": ratio >= TARGET},
               {"description": "packed linear weights stored in ~1/16 of fp32 (+ one fp32 scale each)",
                "ratio": dense_bytes / packed_bytes, "target": 16.0,
                "passed": packed_bytes == dense_bytes // 16 + 4 * n_linears}]
    finish("decode", info, targets, args.out, quick=args.quick, source_changed=source_digest() != digest,
           shape=QUICK_SHAPE if args.quick else SHAPE, parameters=n_params, tokens=new_tokens, prompt=PROMPT,
           tokens_per_s=tok_s, cpu_time_tokens_per_s=cpu_tok_s, memory=mem, same_tokens_as_bitlinear=same, times=times)


if __name__ == "__main__":
    main()

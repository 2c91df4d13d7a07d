"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU) by test_distributed.py; prints one JSON line
on rank 0. Argument: ``ddp`` or ``fsdp2``.

Two micro-steps of gradient accumulation on a tiny model, each rank on its own rows, as the
training loop does them (``distributed.grad_sync`` around forward + backward):

* ``accumulated``: gradients reduced only on the last micro-step;
* ``every``: reduced on every micro-step (the reference).

Reports whether the first micro-step reduced anything (DDP: do the ranks' gradients differ after
it; FSDP2: does any sharded gradient exist yet), whether the ranks agree at the end, the largest
difference between the two ways, and (FSDP2) the parameter dtype a block computes with under the
bf16 policy and whether its reduced gradients were summed in fp32.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import hyperbit as hb
from hyperbit.cli import _end_worker
from hyperbit.train import distributed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, pathway="hc",
                         expansion_rate=2)
    model = hb.build_model(cfg)
    with torch.no_grad():  # live connection weights: every parameter gets a gradient
        for name, p in model.named_parameters():
            if "dynamic_" in name or "static_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model


def _full_grads(model) -> list[torch.Tensor]:
    """Every parameter's gradient, unsharded (a collective under FSDP2)."""
    grads = []
    for p in model.parameters():
        g = p.grad
        grads.append(g.full_tensor() if hasattr(g, "full_tensor") else g.clone())
    return grads


def _differ_across_ranks(grads: list[torch.Tensor]) -> bool:
    flat = torch.cat([g.flatten() for g in grads])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return not all(torch.equal(gathered[0], g) for g in gathered[1:])


def run(strategy: str, info, every: bool) -> tuple[list[torch.Tensor], dict]:
    model = _model()
    runner = distributed.wrap(model, strategy, info, torch.device("cpu"), "fp32")
    g = torch.Generator().manual_seed(10 + info.rank)  # each rank its own rows
    micro = [torch.randint(0, 64, (2, 9), generator=g) for _ in range(2)]
    seen: dict = {}
    for m, rows in enumerate(micro):
        with distributed.grad_sync(runner, every or m == len(micro) - 1):
            loss = runner(rows[:, :-1], rows[:, 1:])[1] / len(micro)
            loss.backward()
        if m == 0:
            grads = [p.grad for p in model.parameters()]
            if strategy == "fsdp2":  # sharded gradients exist only once they were reduce-scattered
                seen["reduced_after_first"] = any(g is not None for g in grads)
            else:
                seen["reduced_after_first"] = not _differ_across_ranks([g.clone() for g in grads])
    final = _full_grads(model)
    seen["ranks_agree_at_end"] = not _differ_across_ranks(final)
    return final, seen


def block_param_dtype(info) -> str:
    """The dtype of a block's parameters while it computes, FSDP2 with precision bf16."""
    model = _model()
    distributed.wrap(model, "fsdp2", info, torch.device("cpu"), "bf16")
    dtypes = []
    model.blocks[0].attn.register_forward_pre_hook(
        lambda mod, args: dtypes.append(str(next(mod.parameters()).dtype)))
    idx = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    idx = idx + info.rank  # the ranks' gradients differ: their reduction is not bf16-representable
    logits = model(idx)[0].float()
    (logits * torch.linspace(-1, 1, logits.shape[-1])).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    full = torch.cat([g.full_tensor().flatten() for g in grads])
    nonzero = full[full != 0]
    # bf16 gradients summed in fp32 mostly need more than bf16's 8 mantissa bits; summed in bf16, none do
    representable = float((nonzero.bfloat16().float() == nonzero).float().mean())
    return json.dumps({"param_dtype": dtypes[0], "sharded_grad_dtypes": sorted({str(g.dtype) for g in grads}),
                       "bf16_representable": representable})


def main() -> None:
    strategy = sys.argv[1]
    info = distributed.setup(torch.device("cpu"))
    try:
        accumulated, seen_acc = run(strategy, info, every=False)
        reference, seen_ref = run(strategy, info, every=True)
        diff = max(float((a - b).abs().max() / (b.abs().max() + 1e-12))
                   for a, b in zip(accumulated, reference))
        extra = json.loads(block_param_dtype(info)) if strategy == "fsdp2" else {}
        if info.is_main:
            print(json.dumps({"accumulated": seen_acc, "every": seen_ref, "max_rel_diff": diff,
                              "grads": len(accumulated), **extra}))
    finally:
        distributed.teardown(info)


if __name__ == "__main__":
    main()
    _end_worker(0)  # as the hyperbit command ends its torchrun workers

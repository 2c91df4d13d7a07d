"""The loop on its device: fused AdamW on CUDA, bf16 parameters, per-block compile and activation
checkpointing applied before distribution, and (marked ``cuda``) steps that never make the host
wait for the GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hyperbit as hb
from hyperbit.analysis import pathway_summary
from hyperbit.cli import main
from hyperbit.config import ConfigError
from hyperbit.models import fast
from hyperbit.train import distributed, loop, resolve_run_config
from hyperbit.train.optim import fused_supported, make_optimizer
from hyperbit.train.rundir import check_resumable

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]
TINY = ["train", "--preset", "tiny", "train.log_every=1", "train.eval_batches=1", "train.eval_every=0",
        "train.precision=fp32", "model.pathway=hc", "model.expansion_rate=2"]


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _tiny_model(device, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = hb.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, pathway="hc",
                         expansion_rate=2)
    return hb.build_model(cfg).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_is_fused_exactly_on_cuda(device, dtype):
    model = _tiny_model(device, dtype)
    opt = make_optimizer(model, lr=1e-3)
    assert bool(opt.defaults["fused"]) == (device == "cuda") == fused_supported(model.parameters())
    assert not fused_supported([])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_parameters_train_with_the_runs_optimizer(device):
    """A model cast to bf16 trains (its loss on a memorised batch falls), keeps bf16 parameters and
    optimizer state, and the monitors read it."""
    model = _tiny_model(device, torch.bfloat16)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for _ in range(10):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.bfloat16}
    summary = pathway_summary(model, idx[:, :-1])
    assert all(math.isfinite(v) for values in summary.values() for v in values)
    assert max(summary["gain_row"]) > 1.0  # the mixing moved


def test_compile_and_checkpointing_are_applied_per_block_before_wrapping(tmp_path, monkeypatch):
    """``train.compile`` compiles each block (models.fast.compile_blocks), never the whole wrapped
    model, and like ``train.activation_checkpointing`` acts on the bare model before DDP / FSDP2."""
    calls = []
    real_ckpt, real_wrap = fast.set_activation_checkpointing, distributed.wrap

    def ckpt(model, enabled):
        calls.append(("checkpointing", type(model).__name__, enabled))
        return real_ckpt(model, enabled)

    def compile_blocks(model, **kwargs):  # stands in for the compiler (seconds, not minutes)
        calls.append(("compile", type(model).__name__))
        return model

    def wrap(*args, **kwargs):
        calls.append(("wrap",))
        return real_wrap(*args, **kwargs)

    monkeypatch.setattr(loop, "set_activation_checkpointing", ckpt)
    monkeypatch.setattr(loop, "compile_blocks", compile_blocks)
    monkeypatch.setattr(loop.distributed, "wrap", wrap)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("the whole model was compiled"))
    assert main([*TINY, "--out", str(tmp_path / "run"), "train.steps=2", "train.compile=true",
                 "train.activation_checkpointing=true"]) == 0
    assert calls == [("checkpointing", "TransformerLM", True), ("compile", "TransformerLM"), ("wrap",)]


def test_activation_checkpointing_follows_eager_exactly(tmp_path):
    assert main([*TINY, "--out", str(tmp_path / "eager"), "train.steps=3"]) == 0
    assert main([*TINY, "--out", str(tmp_path / "ckpt"), "train.steps=3",
                 "train.activation_checkpointing=true"]) == 0
    eager, ckpt = _losses(tmp_path / "eager"), _losses(tmp_path / "ckpt")
    assert len(eager) == 3 and ckpt == eager  # recomputation is bit-exact on the CPU


def test_new_settings_are_validated_and_resumable():
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        resolve_run_config("tiny", ["train.activation_checkpointing=maybe"])
    saved = resolve_run_config("tiny", [])
    given = resolve_run_config("tiny", ["train.activation_checkpointing=true", "train.compile=true",
                                        "train.deterministic=true"])
    check_resumable(saved, given)  # how a run computes, not what: a resume may change them


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_never_wait_for_the_gpu(tmp_path, precision):
    """A step (two accumulated micro-batches, clipping, fused AdamW; fp16 with its gradient
    scaler) queues work without one host synchronisation: CUDA's sync debug mode raises on any."""
    cfg = resolve_run_config("tiny", ["model.pathway=hc", "model.expansion_rate=2", "train.device=cuda",
                                      f"train.precision={precision}", "train.grad_accum=2"])
    out = tmp_path / "run"
    out.mkdir()
    device = torch.device("cuda")
    steps = loop._Loop(cfg, out, False, lambda _: None, distributed.DistInfo(), device)
    steps._step(0)  # first-call work: allocations, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            loss, grad_norm = steps._step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.device.type == "cuda" and math.isfinite(float(loss)) and float(grad_norm) > 0
    steps._check_finite()

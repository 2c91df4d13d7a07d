"""Fast paths match the eager reference: regional compile (forward and every parameter's gradient)
and per-block activation checkpointing (identical loss and gradients, less saved memory)."""

from __future__ import annotations

import collections

import pytest
import torch

from hyperbit import ModelConfig
from hyperbit.models import build_model, compile_blocks, set_activation_checkpointing
from hyperbit.nn import native, native_mhc
from hyperbit.pathways import HyperConnection

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]
KINDS = {"prenorm": {}, "dhc4": dict(pathway="hc", expansion_rate=4),
         "shc4": dict(pathway="hc", expansion_rate=4, hc_dynamic=False),
         "mhc4": dict(pathway="mhc", expansion_rate=4)}


def _model(kind: str, seed: int = 0, device: str = "cpu", **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, **KINDS[kind], **kw)
    model = build_model(cfg)
    with torch.no_grad():  # move off the Pre-Norm-equivalent init, so the connections matter
        for name, p in model.named_parameters():
            if "static_" in name or "dynamic_" in name or ".phi" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device)


def _batch(seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    return idx.to(device), targets.to(device)


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _compiled_matches_eager(kind: str, backend: str, fused_hc: bool = True, device: str = "cpu"):
    idx, targets = _batch(device=device)
    eager = _model(kind, device=device)
    compiled = compile_blocks(_model(kind, device=device), fused_hc=fused_hc, backend=backend, fullgraph=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # keys unchanged
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(a, b)
    ref, got = _loss_and_grads(eager, idx, targets), _loss_and_grads(compiled, idx, targets)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)
    assert set(got[2]) == set(ref[2])
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-4, atol=1e-6, msg=name)
    return compiled


@pytest.mark.parametrize("kind,fused_hc", [pytest.param("prenorm", True, marks=pytest.mark.slow),
                                           ("dhc4", True), pytest.param("dhc4", False, marks=pytest.mark.slow),
                                           ("mhc4", True)])
def test_compiled_blocks_trace_and_match_eager(kind, fused_hc):
    """Dynamo + AOT autograd (``aot_eager``: the graphs Inductor would get, run eagerly), each
    block in one graph (``fullgraph``): forward and every gradient equal the eager model's."""
    torch._dynamo.reset()
    compiled = _compiled_matches_eager(kind, "aot_eager", fused_hc)
    hcs = [m for m in compiled.modules() if isinstance(m, HyperConnection)]
    assert len(hcs) == (4 if kind == "dhc4" else 0)  # (mHC is not a HyperConnection)
    assert all(m.fused is fused_hc for m in hcs) and HyperConnection.fused  # class default untouched
    assert all(b._compiled_call_impl is not None for b in compiled.blocks)


@pytest.mark.parametrize("kind", ["shc4", "dhc4", "mhc4"])
def test_compiled_blocks_stay_whole_under_autocast(kind):
    """Under bf16 autocast, as training runs on CPU and GPU, every block still traces into one
    graph (``fullgraph``: a graph break inside the connections' autocast-off regions is an error
    there) and follows the eager model."""
    torch._dynamo.reset()
    idx, targets = _batch()
    eager = _model(kind)
    compiled = compile_blocks(_model(kind), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = _loss_and_grads(eager, idx, targets), _loss_and_grads(compiled, idx, targets)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-2, atol=1e-2)
    # all gradients as one vector (some mHC gate/bias gradients are ~1e-9 at this init: per
    # parameter, bf16 rounding alone moves them by more than their size; measured 4e-4 to 7e-4)
    flat = [torch.cat([g[name].flatten().float() for name in ref[2]]) for g in (got[2], ref[2])]
    assert float((flat[0] - flat[1]).norm() / flat[1].norm()) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["prenorm", "dhc4", "mhc4"])
def test_compiled_blocks_inductor_match_eager(kind, device):
    torch._dynamo.reset()
    _compiled_matches_eager(kind, "inductor", device=device)


def _saved_bytes(model, idx, targets) -> int:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["prenorm", "dhc4", "shc4"])
def test_activation_checkpointing_identical_loss_and_gradients(kind, fused, device, monkeypatch):
    monkeypatch.setattr(HyperConnection, "fused", fused)
    idx, targets = _batch(device=device)
    plain, ckpt = _model(kind, device=device), set_activation_checkpointing(_model(kind, device=device))
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    ref, got = _loss_and_grads(plain, idx, targets), _loss_and_grads(ckpt, idx, targets)
    # bit-identical on the CPU; CUDA's atomics (embedding backward) may reorder sums
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], ref[1], **tol)
    torch.testing.assert_close(got[0], ref[0], **tol)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **tol, msg=name)
    # only each block's input (plus the embedding / head side) stays saved
    full, lean = _saved_bytes(plain, idx, targets), _saved_bytes(ckpt, idx, targets)
    assert lean < 0.6 * full, (lean, full)
    # off again: the class's forward, the full saved set
    set_activation_checkpointing(ckpt, enabled=False)
    assert "forward" not in vars(ckpt.blocks[0]) and _saved_bytes(ckpt, idx, targets) == full


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("kind", ["dhc4", "shc4"])
def test_rebuild_offers_stay_inside_a_block(kind, checkpointed):
    """A width connection may rebuild its streams from tensors the previous connection keeps
    (``pathways.hyper``). A block's first connection always keeps a copy (its input carries no
    offer: the previous block's second connection rebuilt, so it offered nothing), and offers it to
    the second. So the offers never cross blocks, and checkpointing, which keeps only each block's
    input, keeps nothing of the previous block through them."""
    from hyperbit.pathways import hyper

    model = _model(kind)
    if checkpointed:
        set_activation_checkpointing(model)
    idx, targets = _batch()
    outputs, inner = [], []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.blocks]
    hooks += [b.attn_path.register_forward_hook(lambda m, a, out: inner.append(out)) for b in model.blocks]
    model(idx, targets)
    for h in hooks:
        h.remove()
    assert len(outputs) == len(inner) == len(model.blocks)
    assert not any(hasattr(out, hyper._REBUILD) for out in outputs)
    assert all(hasattr(out, hyper._REBUILD) for out in inner)


def test_activation_checkpointing_leaves_decoding_alone():
    model = set_activation_checkpointing(_model("dhc4"))
    ref = _model("dhc4")
    idx, _ = _batch()
    with torch.no_grad():
        cache, cache_ref = model.make_cache(), ref.make_cache()
        out, out_ref = model(idx[:, :8], cache=cache)[0], ref(idx[:, :8], cache=cache_ref)[0]
        nxt, nxt_ref = model(idx[:, 8:9], cache=cache)[0], ref(idx[:, 8:9], cache=cache_ref)[0]
    assert torch.equal(out, out_ref) and torch.equal(nxt, nxt_ref)


def test_fast_paths_reject_a_module_without_blocks():
    with pytest.raises(ValueError, match="TransformerLM"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="TransformerLM"):
        set_activation_checkpointing(torch.nn.Linear(2, 2))


def _counting(monkeypatch) -> collections.Counter:
    """Calls of the connections' kernels by name; ``rebuilt``: backward calls that rebuilt the
    streams (given no ``h``)."""
    calls: collections.Counter = collections.Counter()
    for module, name in [(native, n) for n in ("hc_forward", "hc_forward_dynamic", "hc_backward", "depth_forward",
                                               "depth_backward", "hc_rebuild")] + [
            (native_mhc, n) for n in ("mhc_forward", "mhc_backward_fused", "mhc_project")]:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            if _name in ("hc_backward", "mhc_backward_fused") and args[0] is None:
                calls["rebuilt"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the PyTorch path runs")
@pytest.mark.parametrize("kind,width,backward", [("dhc4", "hc_forward_dynamic", "hc_backward"),
                                                 ("shc4", "hc_forward", "hc_backward"),
                                                 ("mhc4", "mhc_forward", "mhc_backward_fused")])
@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_blocks_run_the_kernels_and_match_eager(kind, width, backward, autocast, monkeypatch):
    """Each block in one graph (``fullgraph``), the connections' kernels called from it once per
    branch forward and backward (mHC's one-pass kernels for mHC; the depth connection mixing the
    streams, ``hc_rebuild``; the second connection of each block rebuilding its streams in
    backward), and loss and gradients those of the eager model (which runs the same kernels)."""
    torch._dynamo.reset()
    calls = _counting(monkeypatch)
    idx, targets = _batch()
    eager, compiled = _model(kind), compile_blocks(_model(kind), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = _loss_and_grads(eager, idx, targets)
        calls.clear()
        got = _loss_and_grads(compiled, idx, targets)
    branches = 2 * len(compiled.blocks)
    assert calls == {width: branches, backward: branches, "hc_rebuild": branches,
                     "depth_backward": branches, "rebuilt": len(compiled.blocks)}
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], **tol)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **tol, msg=name)


@pytest.mark.parametrize("kind", ["dhc4", "shc4", "mhc4"])
def test_compiled_blocks_keep_one_copy_of_the_streams_per_block(kind, monkeypatch):
    """Inside a compiled block the second connection rebuilds its streams from what the first
    keeps (``feeds_next``): under autocast, one bf16 copy of the streams per block fewer saved than
    with the rebuild off (with the C kernels; on the PyTorch path, CUDA's, the compiler picks what
    to save among the traced ops: 0.4-0.7 of a copy per block fewer measured at this size), and the
    same gradients."""
    from hyperbit.pathways import hyper

    idx, targets = _batch()
    saved, grads = {}, {}
    for rebuild in (True, False):
        monkeypatch.setattr(hyper, "REBUILD_STREAMS", rebuild)
        torch._dynamo.reset()
        model = compile_blocks(_model(kind), backend="aot_eager", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved[rebuild] = _saved_bytes(model, idx, targets)
            grads[rebuild] = _loss_and_grads(model, idx, targets)[2]
    copy = idx.numel() * 4 * model.cfg.dim * 2  # n = 4 streams of d, in bf16
    if native.library() is not None:
        assert saved[False] - saved[True] == len(model.blocks) * copy, (saved, copy)
    else:
        assert saved[False] - saved[True] >= 0.4 * len(model.blocks) * copy, (saved, copy)
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("kind", ["dhc4", "mhc4"])
def test_checkpointed_blocks_compile_whole_and_match_eager(kind):
    """Checkpointing then compiling (the documented order), each block in one graph under
    autocast: the connections make no offer there (a side effect a checkpointed region may not
    have), and loss and gradients follow the eager model."""
    torch._dynamo.reset()
    idx, targets = _batch()
    eager = _model(kind)
    compiled = compile_blocks(set_activation_checkpointing(_model(kind)), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = _loss_and_grads(eager, idx, targets), _loss_and_grads(compiled, idx, targets)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-2, atol=1e-2)
    flat = [torch.cat([g[name].flatten().float() for name in ref[2]]) for g in (got[2], ref[2])]
    assert float((flat[0] - flat[1]).norm() / flat[1].norm()) < 1e-2
    set_activation_checkpointing(compiled, enabled=False)
    assert all(b.attn_path.feeds_next for b in compiled.blocks)  # offers back on


def test_compiled_mhc_keeps_no_more_than_the_eager_node():
    """Inside torch.compile mHC's width connection is three nodes (projection, the per-token map in
    plain autograd, HC's mixing with per-token weights) that keep one copy of the streams between
    them, as the eager fused node does: the compiled block saves no more than the eager one (with
    the C kernels; 1.008x on the PyTorch path, where the compiler picks among the traced ops).
    Plain autograd there kept 1.24x: the streams in fp32 for the projection and the mixing."""
    torch._dynamo.reset()
    idx, targets = _batch()
    eager, compiled = _model("mhc4"), compile_blocks(_model("mhc4"), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slack = 1.0 if native.library() is not None else 1.02
        assert _saved_bytes(compiled, idx, targets) <= slack * _saved_bytes(eager, idx, targets)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "fp16-autocast", "bf16-params"])
@pytest.mark.parametrize("kw", [dict(pathway="hc", expansion_rate=1),
                                dict(pathway="hc", expansion_rate=2, hc_dynamic=False),
                                dict(pathway="mhc", expansion_rate=2, mhc_res="permutations")],
                         ids=["hc1", "shc2", "mhc2-permutations"])
def test_compiled_blocks_in_every_precision(kw, precision):
    """The compiled paths of the less common configurations (one stream: the branch norm in
    PyTorch around the kernels; static weights; mHC's permutations map) in every precision: each
    block in one graph, and the gradients those of the eager model."""
    dtype = torch.bfloat16 if precision == "bf16-params" else torch.float32
    amp = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(precision)
    idx, targets = _batch()
    grads = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, **kw))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(k in name for k in ("static", "phi", "bias_", "gate_")):
                    p.add_(0.1 * torch.randn_like(p))
        model = model.to(dtype)
        if compiled:
            compile_blocks(model, backend="aot_eager", fullgraph=True)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            g = _loss_and_grads(model, idx, targets)[2]
        grads.append(torch.cat([g[name].float().flatten() for name in sorted(g)]))
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < tol

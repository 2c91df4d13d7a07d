"""The wiring check (spec section 8, item 5): is every block's residual path what it claims?

Four independent checks on a :class:`~hyperbit.models.TransformerLM` (or any model with the same
shape: ``embed``, ``blocks`` whose ``branches()`` give ``(pathway, branch)`` pairs, ``pathways()``,
``expand`` / ``reduce``, ``final_norm`` and ``cfg.vocab_size`` / ``cfg.max_seq_len``), each
reported per block:

1. **skip path** - with the output projection every branch declares (:mod:`hyperbit.nn.branch`)
   zeroed, each block must map its input exactly as its pathways' skip paths say (identity for
   Pre-Norm and HC at init, the norm for Post-Norm), and the final-norm input must be
   ``reduce(...(expand(embedding)))``. Catches a block that doubles (``x = x + x``) or drops its
   input.
2. **chain** - with live branches, every pathway is called exactly once, in order, and each one
   receives exactly the state the previous one returned (the first one ``expand(embedding)``; the
   final norm ``reduce`` of the last). Catches stale tensors (a skip captured once and re-added),
   extra additions around a pathway, and branches that bypass their pathway.
3. **norms** - no norm module or norm weight is shared by two branches or with the final norm.
4. **gradient** - with branch outputs zeroed, the loss gradient reaches every block's input (and
   the embedding) through the skip path alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn.branch import output_projections
from ..pathways import Pathway
from ._hooks import recording


@dataclass
class WiringReport:
    problems: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"wiring check: {'PASS' if self.ok else 'FAIL'}"]
        lines += [f"  [{'ok' if passed else 'FAIL'}] {name}" for name, passed in self.checks.items()]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def check_wiring(model: nn.Module, idx: Tensor | None = None, rtol: float = 1e-4,
                 atol: float = 1e-5) -> WiringReport:
    """Run all four checks on ``model`` (a TransformerLM) and return a report; never raises on a
    mis-wired model (a branch that declares no output projection is a ValueError: there is no skip
    path to isolate). ``idx`` defaults to a small random batch of token ids."""
    if idx is None and hasattr(model, "example_input"):  # a model of other inputs (a ViT's images)
        idx = model.example_input()
    if idx is None:
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, model.cfg.vocab_size, (2, min(16, model.cfg.max_seq_len)), generator=g)
    idx = idx.to(model.embed.weight.device)
    report = WiringReport()
    was_training = model.training
    model.eval()
    try:
        for name, check in (("skip path", _check_skip_path), ("chain", _check_chain),
                            ("norms", _check_norms), ("gradient", _check_gradient)):
            found = check(model, idx, rtol, atol)
            report.checks[name] = not found
            report.problems += found
    finally:
        model.train(was_training)
    return report


# -- helpers ------------------------------------------------------------------------------------
def _where(model: nn.Module, part: nn.Module) -> str:
    for b, block in enumerate(model.blocks):
        for name, module in block.named_modules():
            if module is part:
                return f"block {b} ({name})"
    return "outside the blocks"


def _block_pathways(block: nn.Module) -> list[Pathway]:
    return [pathway for pathway, _ in block.branches()]


def _close(a: Tensor, b: Tensor, rtol: float, atol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol))


def _describe(got: Tensor, want: Tensor) -> str:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    scale = (got.float() * want.float()).sum() / want.float().pow(2).sum().clamp_min(1e-30)
    hint = ""
    if torch.allclose(got.float(), 2 * want.float(), rtol=1e-3, atol=1e-6):
        hint = " - it doubles its input (x = x + x?)"
    elif got.float().abs().max() < 1e-6:
        hint = " - its input is dropped"
    return f"max |diff| {(got.float() - want.float()).abs().max():.3g}, scale {scale:.3g}{hint}"


@contextlib.contextmanager
def _zeroed_output_projections(model: nn.Module):
    projections = [p for block in model.blocks for _, branch in block.branches()
                   for p in output_projections(branch)]
    saved = [p.weight.detach().clone() for p in projections]
    with torch.no_grad():
        for p in projections:
            p.weight.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(projections, saved):
                p.weight.copy_(w)


@contextlib.contextmanager
def _recording(modules: list[nn.Module]):
    """Record ``(module, input state, output state)`` for every call, in call order."""
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    with recording(modules, lambda mod, args, out: calls.append((mod, args[0], out))):
        yield calls


def _final_norm_input(model: nn.Module, idx: Tensor) -> Tensor:
    captured = []
    with recording([model.final_norm], lambda m, args: captured.append(args[0]), pre=True):
        model(idx)
    return captured[-1]


# -- the four checks ----------------------------------------------------------------------------
@torch.no_grad()
def _check_skip_path(model, idx, rtol, atol) -> list[str]:
    problems = []
    with _zeroed_output_projections(model), _recording(list(model.blocks)) as calls:
        final_in = _final_norm_input(model, idx)
        for b, (block, h_in, h_out) in enumerate(calls):
            want = h_in
            for pathway in _block_pathways(block):
                want = pathway.skip(want)
            if not _close(h_out, want, rtol, atol):
                problems.append(f"block {b}: with zeroed branches its output is not its pathways' "
                                f"skip path of its input ({_describe(h_out, want)})")
        state = model.expand(model.embed(idx))  # the whole skip path, computed without the blocks
        for pathway in model.pathways():
            state = pathway.skip(state)
        want = model.reduce(state)
        if not problems and not _close(final_in, want, rtol, atol):
            problems.append("model: with zeroed branches the final-norm input is not "
                            f"reduce(skip path(expand(embedding))) ({_describe(final_in, want)})")
    return problems


@torch.no_grad()
def _check_chain(model, idx, rtol, atol) -> list[str]:
    problems = []
    expected_order = model.pathways()
    with _recording(expected_order) as calls:
        final_in = _final_norm_input(model, idx)
    called = [mod for mod, _, _ in calls]
    for pathway in expected_order:
        count = sum(m is pathway for m in called)
        if count != 1:
            problems.append(f"{_where(model, pathway)}: pathway called {count} times (expected once)")
    if problems:
        return problems
    if called != expected_order:
        return ["pathways are not called in block order (attention then FFN of each block)"]
    state = model.expand(model.embed(idx))
    for pathway, h_in, h_out in calls:
        if not _close(h_in, state, rtol, atol):
            source = "expand(embedding)" if pathway is called[0] else "the previous pathway's output"
            problems.append(f"{_where(model, pathway)}: its input is not {source} "
                            f"(stale or extra tensor? {_describe(h_in, state)})")
        state = h_out
    want = model.reduce(state)
    if not _close(final_in, want, rtol, atol):
        problems.append("model: the final norm does not receive reduce(last pathway's output) "
                        f"({_describe(final_in, want)})")
    return problems


def _check_norms(model, idx, rtol, atol) -> list[str]:
    problems, owner_of_module, owner_of_weight = [], {}, {}
    branches = [(_where(model, p), p.norms()) for p in model.pathways()]
    for block in model.blocks:
        for _, branch in block.branches():
            norms = [m for m in branch.modules() if type(m).__name__.endswith("Norm")]
            branches.append((_where(model, branch), norms))
    branches.append(("final norm", [model.final_norm]))
    for where, norms in branches:
        for norm in norms:
            first = owner_of_module.setdefault(id(norm), where)
            if first != where:
                problems.append(f"{where}: shares its norm module with {first}")
                continue
            weight = getattr(norm, "weight", None)
            if weight is not None:
                first = owner_of_weight.setdefault(weight.data_ptr(), where)
                if first != where:
                    problems.append(f"{where}: shares its norm weight with {first}")
    return problems


def _check_gradient(model, idx, rtol, atol) -> list[str]:
    problems, grads = [], {}
    with _zeroed_output_projections(model), _recording(list(model.blocks)) as calls:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            # the objective reads every position of the final-norm input (a ViT's pooled logits
            # would read only its class token, which no image reaches without the branches)
            final_in = _final_norm_input(model, idx)
            for b, (_, h_in, _) in enumerate(calls):
                if h_in.requires_grad:
                    h_in.register_hook(lambda g, b=b: grads.__setitem__(b, g.abs().max().item()))
            model.final_norm(final_in).float().pow(2).mean().backward()
    for b in range(len(model.blocks)):
        if grads.get(b, 0.0) == 0.0:
            problems.append(f"block {b}: no gradient reaches its input through the skip path")
    emb = model.embed.weight.grad
    if emb is None or emb.abs().max() == 0:
        problems.append("model: no gradient reaches the embedding through the skip path")
    model.zero_grad(set_to_none=True)
    return problems

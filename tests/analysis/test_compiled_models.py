"""The analyses that record through module hooks (connection states, the wiring check, inspect)
on a model whose blocks are compiled: dynamo does not guard on module hooks, so a graph compiled
before the hooks existed skips them; the analyses run the compiled blocks eagerly instead."""

from __future__ import annotations

import pytest
import torch

from hyperbit import ModelConfig
from hyperbit.analysis.connections import pathway_states
from hyperbit.analysis.inspect import analyse
from hyperbit.analysis.wiring import check_wiring
from hyperbit.models import build_model, compile_blocks


@pytest.fixture
def compiled_lm():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, pathway="hc",
                      expansion_rate=2)
    model = compile_blocks(build_model(cfg), backend="eager")  # dynamo's tracing, no codegen
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(idx)  # the graphs now exist, compiled without any hook
    return model, idx


def test_connection_states_of_a_compiled_model(compiled_lm):
    model, idx = compiled_lm
    states = pathway_states(model, idx)
    assert [s.pathway for s in states] == list(model.pathways())


def test_wiring_check_of_a_compiled_model(compiled_lm):
    model, idx = compiled_lm
    report = check_wiring(model, idx)
    assert report.ok and len(report.checks) == 4, str(report)


def test_inspect_of_a_compiled_model(compiled_lm):
    model, idx = compiled_lm
    out = analyse(model, idx, idx)
    assert len(out["output_rms"]) == 1 + 2 * 2  # the embedding, then every branch
    assert len(out["collapse"]["median"]) == 2 * 2 - 1

"""Checkpointing FSDP2-sharded models with the same on-disk format as unsharded ones.

Saving gathers full (unsharded) model and optimizer state dicts on every rank with
``torch.distributed.checkpoint.state_dict`` (a collective) and hands rank 0 snapshot objects that
:func:`~hyperbit.train.checkpoint.save_checkpoint` writes like any model / optimizer. Loading reads
the full optimizer state from disk on every rank and lets ``set_optimizer_state_dict`` shard it.
The optimizer state on disk is index-keyed (``torch.optim`` format), so a checkpoint written by an
FSDP2 run resumes under DDP or on one process, and the other way round.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class _Snapshot:
    """Quacks like a module / optimizer for ``save_checkpoint``: returns a fixed state dict."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _fqns(model: nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (groups in order, params in order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_state(model: nn.Module, optimizer) -> tuple[_Snapshot, _Snapshot]:
    """Full model and (index-keyed) optimizer state, on CPU. Every rank must call it (a
    collective); rank 0 gets the state, the other ranks empty snapshots."""
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not optim_sd:  # cpu_offload gathers onto rank 0 only
        return _Snapshot(model_sd), _Snapshot({})
    index = {fqn: i for i, fqn in enumerate(_fqns(model, optimizer))}
    state = {index[fqn]: value for fqn, value in optim_sd["state"].items()}
    groups = [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in optim_sd["param_groups"]]
    return _Snapshot(model_sd), _Snapshot({"state": state, "param_groups": groups})


class ShardedOptimizerLoader:
    """Passed to ``load_checkpoint`` as the optimizer: shape checks see the real (sharded)
    optimizer's param groups; loading converts to FQN keys and shards via set_optimizer_state_dict."""

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer
        self.param_groups = optimizer.param_groups

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        fqns = _fqns(self.model, self.optimizer)
        state = {fqns[int(i)]: value for i, value in sd["state"].items()}
        groups = [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

"""Process-group setup for ``torchrun``: gloo on CPU, NCCL on CUDA; DDP or FSDP2 wrapping.

Under ``torchrun`` every rank computes its slice of the same global batch a single process would
use, so a run on N processes follows the single-process run (up to the order of floating-point
reductions). Only rank 0 prepares data, logs and writes files.

The device decides the backend, never the other way round: :func:`train_device` gives each local
process its own GPU (``cuda:<local rank>``) when there is one GPU per local process, else the CPU
(``"auto"``) or a one-line ConfigError (``"cuda"``). Any ``torchrun`` launch joins a process group,
one process included, so DDP and FSDP2 run as they would on more. With NCCL a second, gloo, group
carries the host-side flags (:func:`any_rank`), which then never wait for the GPU.

Gradient accumulation synchronises gradients once per optimizer step (:func:`grad_sync`), and an
FSDP2 run in bf16 gathers its parameters in bf16 and reduces gradients in fp32
(:func:`wrap`, ``MixedPrecisionPolicy``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

#: what ``torchrun`` (and any ``env://`` launcher) sets for every process it starts
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def pick_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU; ``"cuda"`` without CUDA is a ConfigError."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another ``env://`` launcher)."""
    return all(name in os.environ for name in LAUNCH_VARS)


def train_device(device: str | None) -> torch.device:
    """The device this training process uses (``train.device``: "auto", "cpu" or "cuda").

    Outside ``torchrun`` as :func:`pick_device`. Under ``torchrun`` each of the node's processes
    needs a GPU of its own, ``cuda:<local rank>``: with fewer GPUs than local processes "auto" runs
    on the CPU (gloo) and "cuda" is a ConfigError naming both numbers."""
    picked = pick_device(device)
    if picked.type != "cuda" or not launched():
        return picked
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count()
    if gpus >= local_world and local_rank < gpus:
        return torch.device(f"cuda:{local_rank}")
    if device == "cuda":
        raise ConfigError(f"train.device='cuda' under torchrun needs one GPU per process: {local_world} "
                          f"processes on this node, {gpus} GPU(s); start fewer or use train.device=cpu")
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # in a process group (every torchrun launch, one process included)
    control: Any = field(default=None, compare=False)  # gloo group for host-side flags (NCCL runs)
    owns_group: bool = False  # setup() created the process group (teardown() destroys only that)

    @property
    def enabled(self) -> bool:
        return self.joined

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op without torchrun):
    NCCL for a CUDA ``device`` (which must be this process's own GPU), gloo for the CPU."""
    if not launched():
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.type == "cuda"
    owns = not dist.is_initialized()
    if owns:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    return DistInfo(rank, world, local_rank, joined=True, control=control, owns_group=owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.control)  # a host-side barrier: it does not wait for the GPU


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over the ranks, on its device (no host synchronisation)."""
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def mixed_precision(precision: str):
    """FSDP2's policy for a resolved ``train.precision``: bf16 gathers parameters in bf16 and
    reduces gradients in fp32 (the sharded parameters and the optimizer stay fp32); None
    otherwise (fp16 and fp32 keep FSDP2's default: everything in the parameters' dtype)."""
    if precision != "bf16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(model: nn.Module, strategy: str, info: DistInfo, device: torch.device,
         precision: str = "fp32") -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per block, then the root). Returns the module to call.
    Compile the blocks first (:func:`hyperbit.models.fast.compile_blocks`): sharding goes last."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        policy = mixed_precision(precision)
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ConfigError(f"train.distributed={strategy!r} is not allowed; choose one of ['ddp', 'fsdp2']")


@contextmanager
def grad_sync(runner: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-step's forward and backward: gradients are reduced over the ranks only
    when ``sync`` (the last micro-step of an optimizer step); the others accumulate locally.
    DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync``; a single process: nothing."""
    if hasattr(runner, "no_sync"):  # DDP
        with (nullcontext() if sync else runner.no_sync()):
            yield
    elif hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
        runner.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is set on any rank (every rank must call it: a collective). It runs on
    the CPU (the gloo control group under NCCL), so it never waits for queued GPU work."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.control)
    return bool(value.item())

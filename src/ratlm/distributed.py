"""Process groups and data parallelism, applied to the single-device model from outside (torchtitan style).

One code path serves a CPU process (gloo), one GPU and many GPUs on many nodes: under torchrun every
rank reads RANK / WORLD_SIZE / LOCAL_RANK from the environment; without torchrun a one-process group
is created only when DDP or FSDP is asked for (so `parallel="fsdp"` also works in a plain process).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from .ops.compiling import with_recompile_room

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
DDP_MAX_PARAMS = 100_000_000  # "auto" picks DDP below this size (one all-reduce beats per-block gathers)


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto, cpu, cuda or cuda:N; under torchrun a bare cuda/auto means this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
    return device


def setup(device: str = "auto", need_group: bool = False) -> Runtime:
    """Join (or create) the process group and pick this rank's device."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if under_torchrun else 0
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if under_torchrun and (int(os.environ["WORLD_SIZE"]) > 1 or need_group):
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
            owns = True
        elif need_group:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            owns = True
    if dist.is_initialized():
        return Runtime(dist.get_rank(), dist.get_world_size(), dev, owns)
    return Runtime(0, 1, dev, False)


def teardown(rt: Runtime) -> None:
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max(value: float) -> float:
    """The largest of the ranks' values (e.g. the slowest rank's step time)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_mode(mode: str, world: int, n_params: int) -> str:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if mode == "auto":
        return "none" if world == 1 else ("ddp" if n_params < DDP_MAX_PARAMS else "fsdp")
    return mode


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward instead of storing them.

    The block's own forward is wrapped (not the module), so parameter names and state dicts are
    unchanged; no block draws random numbers, hence no RNG state to preserve.
    """
    for block in model.blocks:
        block.forward = functools.partial(
            checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False
        )


def parallelize(
    model: nn.Module,
    mode: str,
    rt: Runtime,
    bf16: bool,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Apply activation checkpointing, per-block torch.compile, then DDP or FSDP2, in that order.

    FSDP2 shards every block and then the root (embedding + final norm); with bf16 it keeps fp32
    master weights and gathers bf16 copies for compute, reducing gradients in fp32. DDP and plain
    runs use autocast for bf16 instead (see `needs_autocast`).
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        for block in model.blocks:
            # the forward, not the module: FSDP's gather/free hooks stay outside the compiled graph;
            # identical blocks share one compiled graph (parameters are graph inputs); each mixer type,
            # shape and checkpointing choice is one more entry, with room past dynamo's 8 in one process
            block.forward = with_recompile_room(torch.compile(block.forward))
    if mode == "fsdp":
        # imported here: FSDP pulls in the compiler stack, which `ratlm --help` should not wait for
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        last = len(model.blocks) - 1
        for i, block in enumerate(model.blocks):
            # the backward starts with the last block, so resharding it after the forward only wastes a gather
            fully_shard(block, reshard_after_forward=i < last, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if mode == "ddp":
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def needs_autocast(mode: str, bf16: bool) -> bool:
    return bf16 and mode != "fsdp"


def no_sync(model: nn.Module, sync: bool):
    """DDP skips its all-reduce on micro-batches before the last one of a step (gradients accumulate).

    FSDP2 reduce-scatters every micro-batch: gradients then accumulate sharded in fp32 rather than
    unsharded in memory.
    """
    if not sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()

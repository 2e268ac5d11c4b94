"""Process-group start-up and collectives the trainer needs (CPU and GPU alike)."""

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from .parallel_dims import backend_for, device_type


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def set_cpu_threads(threads_per_rank: int) -> int:
    """Share the cores between the ranks of this host (oversubscription slows gloo badly)."""
    if threads_per_rank <= 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads_per_rank = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads_per_rank)
    return threads_per_rank


def init_distributed(world_size: int, timeout_s: float = 300.0) -> torch.device:
    """Start the default process group (when world_size > 1) and return this rank's device."""
    dev_type = device_type()
    _, local_rank, _ = world_info()
    if dev_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(dev_type), timeout=timedelta(seconds=timeout_s),
                                device_id=device if dev_type == "cuda" else None)
    return device


def _replication(param: torch.Tensor, plain_replicas: int) -> int:
    """How many ranks hold an identical copy of this rank's block of ``param``."""
    if isinstance(param, DTensor):
        copies = 1
        for size, placement in zip(param.device_mesh.shape, param.placements):
            if isinstance(placement, Replicate):
                copies *= size
        return copies
    return plain_replicas


@torch.no_grad()
def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, world_size: int,
                    plain_replicas: int | None = None) -> torch.Tensor:
    """Clip gradients by their global L2 norm over every rank; returns the norm.

    Handles a mix of FSDP2 shards, expert-parallel shards (replicated over edp) and plain
    tensors in one all-reduce: each rank adds the squares of its own blocks divided by
    how many ranks hold the same block (``plain_replicas`` for plain tensors: all ranks
    by default, the attention-group size in af_pipe). ``torch.nn.utils.clip_grad_norm_`` cannot mix
    DTensors from different meshes, which is why this is ours.
    """
    replicas = world_size if plain_replicas is None else plain_replicas
    grads = [(p.grad, _replication(p, replicas)) for p in params if p.grad is not None]
    device = grads[0][0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for grad, copies in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        total_sq += local.double().pow(2).sum() / copies
    if world_size > 1:
        dist.all_reduce(total_sq)
    total_norm = total_sq.sqrt().float()
    if max_norm > 0 and math.isfinite(total_norm.item()):
        coef = max_norm / (total_norm + 1e-6)
        if coef < 1.0:
            for grad, _ in grads:
                (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coef)
    return total_norm


def set_pg_timeouts(timeout: timedelta) -> None:
    """Set the timeout of every process group this rank created (collectives on gloo and
    NCCL raise after it). The public API sets timeouts only at creation; like torchtitan
    we use the private setter, here over all groups, which meshes and our ``new_group``
    calls created alike."""
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
            c10d._set_pg_timeout(timeout, group)

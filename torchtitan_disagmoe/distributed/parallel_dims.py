"""Rank layout of a colocated run: data parallelism (FSDP2) and expert parallelism.

Colocated (the expert-parallel baseline): every rank holds the attention blocks, sharded by
FSDP2 over all ``world_size`` ranks, and 1/ep of each MoE layer's experts. Expert-parallel
groups are consecutive ranks; ranks with the same ``ep_rank`` in different groups hold
the same experts (expert data parallelism, ``edp = world_size / ep``):

    world 4, ep 2:   mesh ("edp", "ep") = [[0, 1],
                                           [2, 3]]   rank 2 holds the experts of rank 0

The arithmetic here needs no process group (unit-tested); ``build_meshes`` creates every
mesh on every rank, which FSDP2 on sub-meshes requires (FINDINGS.md: meshes created only
by their members trained silently wrong).
"""

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    world_size: int
    ep: int = 1
    dp_mesh: DeviceMesh | None = field(default=None, repr=False)
    expert_mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.world_size < 1 or self.ep < 1 or self.world_size % self.ep:
            raise ValueError(
                f"parallelism.expert_parallel_degree = {self.ep} must divide the world size {self.world_size}")

    @property
    def dp(self) -> int:
        """Data-parallel ranks: every rank sees different sequences."""
        return self.world_size

    @property
    def edp(self) -> int:
        """Replicas of each expert shard."""
        return self.world_size // self.ep

    @property
    def fsdp_enabled(self) -> bool:
        return self.world_size > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def edp_rank(self, rank: int) -> int:
        return rank // self.ep

    def expert_range(self, rank: int, num_experts: int) -> range:
        """Global ids of the experts that ``rank`` holds."""
        per_rank = num_experts // self.ep
        start = self.ep_rank(rank) * per_rank
        return range(start, start + per_rank)

    def build_meshes(self, device_type: str) -> None:
        """Create the data-parallel mesh and the (edp, ep) expert mesh on every rank."""
        if not self.distributed:
            return
        self.dp_mesh = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp_shard",))
        self.expert_mesh = init_device_mesh(device_type, (self.edp, self.ep), mesh_dim_names=("edp", "ep"))


def device_type() -> str:
    """``cuda`` where a GPU is present, else ``cpu`` (torchtitan would assume cuda)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"

"""Rank layout of a colocated run: data parallelism (FSDP2) and expert parallelism.

Colocated (the expert-parallel baseline): every rank holds the attention blocks, sharded by
FSDP2 over all ``world_size`` ranks, and 1/ep of each MoE layer's experts. Expert-parallel
groups are consecutive ranks; ranks with the same ``ep_rank`` in different groups hold
the same experts (expert data parallelism, ``edp = world_size / ep``):

    world 4, ep 2:   mesh ("edp", "ep") = [[0, 1],
                                           [2, 3]]   rank 2 holds the experts of rank 0

With pipeline parallelism (``pp`` > 1) the ranks form a (pp, dp) grid, pipeline rank
outermost as in torchtitan; FSDP2 and expert parallelism run over the ``dp`` ranks of
one pipeline rank, which hold the same layers:

    world 4, pp 2, ep 2:  mesh ("pp", "edp", "ep") = [[[0, 1]], [[2, 3]]]
                          ranks 0, 1 hold the first stage(s), 2, 3 the next

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
    pp: int = 1
    dp_replicate: int = 1
    """HSDP replica groups (``parallelism.data_parallel_replicate_degree``); FSDP2 shards
    over the other dp / dp_replicate ranks."""
    dp_mesh: DeviceMesh | None = field(default=None, repr=False)
    expert_mesh: DeviceMesh | None = field(default=None, repr=False)
    pp_mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.pp < 1 or self.world_size % self.pp:
            raise ValueError(
                f"parallelism.pipeline_parallel_degree = {self.pp} must divide the world size {self.world_size}")
        if self.world_size < 1 or self.ep < 1 or self.dp % self.ep:
            raise ValueError(f"parallelism.expert_parallel_degree = {self.ep} must divide the data-parallel "
                             f"ranks {self.dp} (world size {self.world_size})")

    @property
    def dp(self) -> int:
        """Data-parallel ranks: ranks of one pipeline rank, each seeing different sequences."""
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        """Replicas of each expert shard."""
        return self.dp // self.ep

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def pp_rank(self, rank: int) -> int:
        return rank // self.dp

    def dp_rank(self, rank: int) -> int:
        return rank % self.dp

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep

    def edp_rank(self, rank: int) -> int:
        return self.dp_rank(rank) // self.ep

    def expert_range(self, rank: int, num_experts: int) -> range:
        """Global ids of the experts that ``rank`` holds."""
        per_rank = num_experts // self.ep
        start = self.ep_rank(rank) * per_rank
        return range(start, start + per_rank)

    def build_meshes(self, device_type: str) -> None:
        """Create the data-parallel mesh and the (edp, ep) expert mesh on every rank (with
        pipeline parallelism: slices of (pp, dp) and (pp, edp, ep) meshes, plus ``pp_mesh``)."""
        if not self.distributed:
            return
        if not self.pp_enabled:
            if self.dp_replicate > 1:  # HSDP: fully_shard on a 2-D mesh shards the inner dim
                self.dp_mesh = init_device_mesh(device_type, (self.dp_replicate, self.world_size // self.dp_replicate),
                                                mesh_dim_names=("dp_replicate", "dp_shard"))
            else:
                self.dp_mesh = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp_shard",))
            self.expert_mesh = init_device_mesh(device_type, (self.edp, self.ep), mesh_dim_names=("edp", "ep"))
            return
        grid = init_device_mesh(device_type, (self.pp, self.dp), mesh_dim_names=("pp", "dp_shard"))
        self.pp_mesh, self.dp_mesh = grid["pp"], grid["dp_shard"]
        experts = init_device_mesh(device_type, (self.pp, self.edp, self.ep), mesh_dim_names=("pp", "edp", "ep"))
        self.expert_mesh = experts["edp", "ep"]


def device_type() -> str:
    """``cuda`` where a GPU is present, else ``cpu`` (torchtitan would assume cuda)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"

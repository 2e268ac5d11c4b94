"""Rank layout of a disaggregated (af_pipe) run: attention pool and expert pool.

Ranks ``0 .. A-1`` form the attention pool, ranks ``A .. A+F-1`` the expert pool. Each
pool is split into p groups of consecutive ranks; group g of each kind owns layers
``g, g+p, g+2p, ...`` (DESIGN.md section 2):

    A=2, F=2, p=2:   A_0 = [0]  A_1 = [1]  F_0 = [2]  F_1 = [3]
                     layer 0: A_0 -> F_0, layer 1: A_1 -> F_1, head on A_0 (= layer L mod p)

Inside an attention group ranks are data parallel: the rank with index d of *every*
attention group owns the same sequences (data-parallel index d). Inside an expert group
the experts of each layer are sharded over the ranks (expert parallelism), or, with
``expert_replicas`` = edp > 1, over each of edp rows of ep ranks (attention index d uses row
d mod edp). The output
head and loss live on attention group ``L mod p``, as if the head were layer L: the last
layer's combine goes there like every other combine, and with p = 1 the head shares
the rank of the embedding.

The arithmetic needs no process group (unit-tested); ``build_meshes`` makes every group's
process group on every rank (FINDINGS.md: a mesh built only by its members trained
silently wrong) and a DeviceMesh on the members.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Role:
    pool: Literal["attention", "expert"]
    group: int
    """g: this rank's group index inside its pool."""
    index: int
    """Position inside the group (the data-parallel index for attention ranks)."""

    def __str__(self) -> str:
        return f"{self.pool} pool, group {self.group}, index {self.index}"


@dataclass
class DisaggDims:
    attention_ranks: int
    expert_ranks: int
    pipeline_depth: int
    num_layers: int
    num_experts: int
    expert_replicas: int = 1
    """edp: copies of each expert inside an expert group. The group's ranks form an
    (edp, ep) grid, row-major; attention rank d of a group dispatches to replica d mod edp,
    and the replicas' expert gradients are summed."""
    dp_replicate: int = 1
    """HSDP inside each attention group: replica groups of FSDP2 (the group's ranks form a
    (dp_replicate, dp / dp_replicate) grid, row-major)."""
    meshes: dict[tuple[str, int], DeviceMesh] = field(default_factory=dict, repr=False)
    groups: dict[tuple[str, int], dist.ProcessGroup] = field(default_factory=dict, repr=False)

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the setting for any layout that cannot run."""
        a, f, p = self.attention_ranks, self.expert_ranks, self.pipeline_depth
        if a < 1 or f < 1:
            raise ValueError(
                f"disagmoe.attention_ranks = {a} and disagmoe.expert_ranks = {f} must both be >= 1 "
                "in af_pipe mode")
        if a + f != world_size:
            raise ValueError(
                f"disagmoe.attention_ranks + disagmoe.expert_ranks = {a} + {f} = {a + f} must equal "
                f"the number of ranks (NGPU = {world_size})")
        if p > self.num_layers:
            raise ValueError(f"disagmoe.pipeline_depth = {p} exceeds the model's {self.num_layers} layers")
        for key, value in (("disagmoe.attention_ranks", a), ("disagmoe.expert_ranks", f)):
            if value % p:
                raise ValueError(f"disagmoe.pipeline_depth = {p} must divide {key} = {value}")
        if self.num_layers % p:
            raise ValueError(
                f"disagmoe.pipeline_depth = {p} must divide the model's {self.num_layers} layers")
        edp = self.expert_replicas
        if edp < 1 or (f // p) % edp or self.dp % edp:
            raise ValueError(
                f"disagmoe.expert_replicas = {edp} must divide both the {f // p} ranks of an expert group "
                f"(disagmoe.expert_ranks / pipeline_depth) and the {self.dp} ranks of an attention group "
                "(each replica serves the same number of attention ranks)")
        if self.num_experts % self.ep:
            raise ValueError(
                f"the {self.num_experts} experts of each layer cannot be split over the "
                f"{self.ep} expert-parallel ranks of an expert group (disagmoe.expert_ranks / pipeline_depth "
                "/ expert_replicas); choose expert_ranks so that this divides the experts")

    @property
    def dp(self) -> int:
        """Ranks per attention group = data-parallel degree."""
        return self.attention_ranks // self.pipeline_depth

    @property
    def expert_group_size(self) -> int:
        return self.expert_ranks // self.pipeline_depth

    @property
    def ep(self) -> int:
        """Expert-parallel degree: ranks one copy of a layer's experts is sharded over."""
        return self.expert_group_size // self.expert_replicas

    @property
    def head_group(self) -> int:
        return self.num_layers % self.pipeline_depth

    def group_of_layer(self, layer_id: int) -> int:
        """Group (of either pool) that runs layer ``layer_id``; layer L is the head."""
        return layer_id % self.pipeline_depth

    def layers_of_group(self, group: int) -> list[int]:
        return list(range(group, self.num_layers, self.pipeline_depth))

    def attention_group_ranks(self, group: int) -> list[int]:
        return list(range(group * self.dp, (group + 1) * self.dp))

    def expert_group_ranks(self, group: int) -> list[int]:
        start = self.attention_ranks + group * self.expert_group_size
        return list(range(start, start + self.expert_group_size))

    def expert_replica_ranks(self, group: int, replica: int) -> list[int]:
        """The ep ranks of one copy of group ``group``'s experts."""
        return self.expert_group_ranks(group)[replica * self.ep:(replica + 1) * self.ep]

    def replica_of(self, dp_index: int) -> int:
        """The expert replica that attention ranks with data-parallel index ``dp_index`` use."""
        return dp_index % self.expert_replicas

    def attention_ranks_of_replica(self, group: int, replica: int) -> list[int]:
        return [r for d, r in enumerate(self.attention_group_ranks(group)) if self.replica_of(d) == replica]

    def role(self, rank: int) -> Role:
        if rank < self.attention_ranks:
            return Role("attention", rank // self.dp, rank % self.dp)
        offset = rank - self.attention_ranks
        return Role("expert", offset // self.expert_group_size, offset % self.expert_group_size)

    def attention_rank(self, group: int, dp_index: int) -> int:
        """Global rank of data-parallel index ``dp_index`` in attention group ``group``."""
        return group * self.dp + dp_index

    def expert_range(self, ep_index: int) -> range:
        """Global ids of the experts held by expert-group member ``ep_index``."""
        per_rank = self.num_experts // self.ep
        return range(ep_index * per_rank, (ep_index + 1) * per_rank)

    def build_meshes(self, device_type: str, rank: int) -> None:
        """Create every group's process group on all ranks, and the members' meshes.

        Keys: ("attention", g) with dim ("dp",), ("expert", g) with dim ("ep",) (("edp", "ep")
        with ``expert_replicas`` > 1), and with
        ``dp_replicate`` > 1 also ("attention_hsdp", g) with dims ("dp_replicate", "dp_shard").
        """
        for g in range(self.pipeline_depth):
            for pool, ranks in (("attention", self.attention_group_ranks(g)),
                                ("expert", self.expert_group_ranks(g))):
                group = dist.new_group(ranks)  # collective: every rank calls it
                if rank in ranks:
                    dim = "dp" if pool == "attention" else "ep"
                    self.groups[(pool, g)] = group
                    self.meshes[(pool, g)] = DeviceMesh.from_group(
                        group, device_type, mesh=ranks, mesh_dim_names=(dim,))
            if self.dp_replicate > 1:
                self._build_hsdp_mesh(g, device_type, rank)
            if self.expert_replicas > 1:
                self._build_expert_mesh(g, device_type, rank)

    def _build_expert_mesh(self, g: int, device_type: str, rank: int) -> None:
        """With expert replicas, ("expert", g) becomes the (edp, ep) grid (the whole group
        stays in ``groups``): expert weights are Shard(0) over ep, Replicate over edp."""
        mesh = _grid_mesh(self.expert_group_ranks(g), self.expert_replicas, ("edp", "ep"), device_type, rank)
        if mesh is not None:
            self.meshes[("expert", g)] = mesh

    def _build_hsdp_mesh(self, g: int, device_type: str, rank: int) -> None:
        mesh = _grid_mesh(self.attention_group_ranks(g), self.dp_replicate, ("dp_replicate", "dp_shard"),
                          device_type, rank)
        if mesh is not None:
            self.meshes[("attention_hsdp", g)] = mesh

    def fsdp_mesh(self, rank: int) -> DeviceMesh:
        """The mesh FSDP2 shards an attention rank's weights over: its group, or the
        group's HSDP grid."""
        role = self.role(rank)
        return self.meshes.get(("attention_hsdp", role.group)) or self.meshes[(role.pool, role.group)]

    def my_group(self, rank: int) -> dist.ProcessGroup:
        role = self.role(rank)
        return self.groups[(role.pool, role.group)]

    def my_mesh(self, rank: int) -> DeviceMesh:
        role = self.role(rank)
        return self.meshes[(role.pool, role.group)]


def _grid_mesh(ranks: list[int], rows: int, names: tuple[str, str], device_type: str, rank: int) -> DeviceMesh | None:
    """A 2-D mesh over ``ranks`` laid out as ``rows`` rows, row-major: dim 0 runs down a
    column, dim 1 along a row. Every rank must call this (it creates process groups);
    members get the mesh, others None."""
    grid = torch.tensor(ranks).view(rows, -1)
    columns = [dist.new_group(col.tolist()) for col in grid.T]  # collective: every rank calls it
    row_groups = [dist.new_group(row.tolist()) for row in grid]
    if rank not in grid:
        return None
    i, j = (grid == rank).nonzero()[0].tolist()
    return DeviceMesh.from_group([columns[j], row_groups[i]], device_type, mesh=grid, mesh_dim_names=names)

"""Shared result type of the AF-Pipe estimate and the baselines, and small helpers."""

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from .cost import LayerCost, ModelCosts
from .memory import MemoryPolicy, MemoryReport


@dataclass
class Estimate:
    """Predicted step of one layout."""

    name: str
    step_time: float
    tokens_per_step: int
    num_gpus: int
    mfu: float
    layout: dict
    """Layout knobs (attention_gpus, expert_gpus, pipeline_depth, microbatches, ...)."""
    pool_time: float
    """Busy time of the slowest pool / stage per step, without fill and drain."""
    memory: MemoryReport
    breakdown: dict = field(default_factory=dict)

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_time / self.num_gpus

    def contract(self) -> dict:
        """The DESIGN.md section 8 fields."""
        lay = self.layout
        return {
            "attention_gpus": lay["attention_gpus"], "expert_gpus": lay["expert_gpus"],
            "pipeline_depth": lay["pipeline_depth"], "microbatches": lay["microbatches"],
            "step_time_s": self.step_time, "tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
            "mfu": self.mfu,
        }


def mfu(costs: ModelCosts, tokens: int, step_time: float, num_gpus: int) -> float:
    return costs.model_flops_per_token() * tokens / (step_time * num_gpus * costs.cluster.peak_flops)


def local_batch(global_batch: int, data_parallel: int) -> int:
    """Sequences per data-parallel rank per step: the requested global batch rounded to a
    multiple of the data-parallel degree (a layout's real global batch is dp x this)."""
    return max(1, round(global_batch / data_parallel))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class GroupLayers:
    """The layers one pipeline group (or stage) owns, as counts of identical layers."""

    layers: tuple[tuple[LayerCost, int], ...]
    head: bool
    embedding: bool
    moe_in: int
    """MoE layers whose combine arrives here (layer l-1 is MoE for an owned layer l or the head)."""

    @property
    def num_layers(self) -> int:
        return sum(n for _, n in self.layers)

    @property
    def num_moe(self) -> int:
        return sum(n for lc, n in self.layers if lc.moe)


@lru_cache(maxsize=256)
def _group_layers(layers: tuple[LayerCost, ...], p: int, contiguous: bool) -> tuple[GroupLayers, ...]:
    n = len(layers)
    out = []
    for g in range(p):
        if contiguous:  # pipeline stage g of a colocated model: layers g*n/p .. (g+1)*n/p - 1
            owned = list(range(g * n // p, (g + 1) * n // p))
            head, embedding = g == p - 1, g == 0
        else:  # AF-Pipe group g: layers g, g+p, ...; head as layer L on group L mod p
            owned = list(range(g, n, p))
            head, embedding = g == n % p, g == 0
        targets = owned + ([n] if head else [])
        moe_in = sum(1 for l in targets if l > 0 and layers[l - 1].moe)
        counts = Counter(layers[l] for l in owned)
        out.append(GroupLayers(tuple(counts.items()), head, embedding, moe_in))
    return tuple(out)


def group_layers(costs: ModelCosts, p: int, contiguous: bool = False) -> tuple[GroupLayers, ...]:
    return _group_layers(tuple(costs.layers), p, contiguous)


def unique_groups(groups: tuple[GroupLayers, ...]) -> list[tuple[int, GroupLayers]]:
    """(index of first occurrence, group) for each distinct group: identical groups cost
    the same, so the search evaluates each shape once."""
    seen: dict[GroupLayers, int] = {}
    for g, grp in enumerate(groups):
        seen.setdefault(grp, g)
    return [(g, grp) for grp, g in seen.items()]


def grad_sync_time(costs: ModelCosts, params: float, replicas: int, policy: MemoryPolicy, bw: float) -> float:
    """Reduce-scatter + all-gather (= all-reduce volume) of fp32 gradients; latency of a
    tree-like log2(replicas) chain each way."""
    if replicas <= 1:
        return 0.0
    c = costs.cluster
    volume = 2 * (replicas - 1) / replicas * params * policy.grad_bytes
    inter = replicas > c.gpus_per_node and c.nodes > 1
    return costs.link_time(0.0 if inter else volume, volume if inter else 0.0, 2 * math.ceil(math.log2(replicas)),
                           inter_bw=bw)


def optimizer_time(costs: ModelCosts, params: float, shards: int, policy: MemoryPolicy) -> float:
    """Adam step: memory-bound, reads and writes the optimizer shard and the weights."""
    c = costs.cluster
    per_param = 2 * (policy.optimizer_bytes + policy.grad_bytes) / shards + 2 * policy.weight_bytes
    return params * per_param / (c.hbm_bw * costs.eff.hbm)

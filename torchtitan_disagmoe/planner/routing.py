"""How many expert ranks a token reaches: the once-per-(token, rank) rule of M2N dispatch.

A token routed to K of E experts, the experts split in contiguous blocks of E/R over R
ranks, is sent once to every rank that holds at least one of its K experts. Under
uniform routing (every K-subset equally likely) a given rank is missed with probability
C(E - E/R, K) / C(E, K), so the expected number of distinct ranks is

    n(E, K, R) = R * (1 - C(E - E/R, K) / C(E, K)).

With measured routing (a trace of expert ids) the count is taken from the data instead.
"""

import itertools
import json
from collections.abc import Sequence
from math import comb
from pathlib import Path


def expected_distinct_ranks(num_experts: int, top_k: int, ranks: int) -> float:
    """Expected distinct ranks hit by a uniform top-k choice of ``num_experts`` experts."""
    if num_experts % ranks:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {ranks} ranks")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k = {top_k} must be in [1, {num_experts}]")
    per_rank = num_experts // ranks
    miss = comb(num_experts - per_rank, top_k) / comb(num_experts, top_k)
    return ranks * (1 - miss)


def brute_force_distinct_ranks(num_experts: int, top_k: int, ranks: int) -> float:
    """The same expectation by enumerating every K-subset (small E only; for tests)."""
    per_rank = num_experts // ranks
    subsets = list(itertools.combinations(range(num_experts), top_k))
    hits = sum(len({e // per_rank for e in s}) for s in subsets)
    return hits / len(subsets)


def distinct_ranks_from_ids(expert_ids: Sequence[Sequence[int]], num_experts: int, ranks: int) -> float:
    """Mean distinct ranks per token from measured routing (rows of K expert ids)."""
    if not expert_ids:
        raise ValueError("routing trace is empty")
    per_rank = num_experts // ranks
    return sum(len({int(e) // per_rank for e in row}) for row in expert_ids) / len(expert_ids)


def load_imbalance_from_ids(expert_ids: Sequence[Sequence[int]], num_experts: int, ranks: int) -> float:
    """Busiest rank's routed copies over the mean (1.0 = perfectly balanced)."""
    per_rank = num_experts // ranks
    load = [0] * ranks
    for row in expert_ids:
        for e in row:
            load[int(e) // per_rank] += 1
    mean = sum(load) / ranks
    return max(load) / mean if mean else 1.0


class RoutingModel:
    """Distinct ranks per token and load imbalance, uniform or from a measured trace."""

    def __init__(self, num_experts: int, top_k: int, trace: Sequence[Sequence[int]] | None = None,
                 imbalance: float = 1.0):
        self.num_experts, self.top_k, self.trace = num_experts, top_k, trace
        self.base_imbalance = imbalance
        self._cache: dict[int, float] = {}
        self._imbalance: dict[int, float] = {}

    @classmethod
    def from_file(cls, path: str, num_experts: int, top_k: int) -> "RoutingModel":
        """A JSON file with a list of per-token expert-id lists (e.g. dumped from a run)."""
        trace = json.loads(Path(path).read_text())
        if not isinstance(trace, list) or not all(isinstance(r, list) and len(r) == top_k for r in trace):
            raise ValueError(f"{path}: expected a JSON list of lists of {top_k} expert ids")
        return cls(num_experts, top_k, trace)

    def distinct_ranks(self, ranks: int) -> float:
        if ranks not in self._cache:
            if self.trace is None:
                self._cache[ranks] = expected_distinct_ranks(self.num_experts, self.top_k, ranks)
            else:
                self._cache[ranks] = distinct_ranks_from_ids(self.trace, self.num_experts, ranks)
        return self._cache[ranks]

    def imbalance(self, ranks: int) -> float:
        if self.trace is None:
            return self.base_imbalance
        if ranks not in self._imbalance:
            self._imbalance[ranks] = load_imbalance_from_ids(self.trace, self.num_experts, ranks)
        return self._imbalance[ranks]

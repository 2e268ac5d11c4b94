"""Search over AF-Pipe layouts and the whole plan (AF-Pipe vs the baselines).

Search space (every layout the runtime's ``DisaggDims`` accepts):
    pipeline depth p        divides the layers, the attention and the expert GPUs
    expert GPUs F = p * ep  ep divides the experts; attention GPUs A = N - F
    micro-batches m         divides each data-parallel rank's sequences
    in-flight bound k       the most micro-batches whose activations fit, capped at k_need
    NIC division            own NIC per GPU, or (A and F spread over every node) the
                            attention pool's share of each node's NICs in 1/16 steps
    recomputation           off, or full (only matters when memory is short)

Two phases (DESIGN.md section 5): (1) minimise the slower pool's busy time per token;
(2) among the layouts within ``tolerance`` (1%) of that, take the highest MFU (which
adds fill/drain, gradient reduction and optimizer time).

    python -m torchtitan_disagmoe.planner --model qwen3_moe --flavor 235B-A22B \\
        --cluster h800 --nodes 16 --seq-len 4096
"""

import time
from collections import Counter
from dataclasses import dataclass, field, replace

from .af_pipe import AFLayout, af_memory, estimate_af_pipe, max_in_flight_that_fits
from .baselines import BASELINES, best_baseline
from .cost import ModelCosts
from .estimate import Estimate, divisors, local_batch
from .memory import MemoryPolicy, MemoryReport

NIC_SHARES = tuple(i / 16 for i in range(1, 16))
TOKENS_PER_GPU = 65536
"""Default global batch: this many tokens per GPU per step (1,024 GPUs: 64 M tokens,
about DeepSeek-V3's 15,360 x 4K on 2,048 GPUs)."""


def default_global_batch(num_gpus: int, seq_len: int) -> int:
    return max(1, round(num_gpus * TOKENS_PER_GPU / seq_len))


@dataclass
class SearchResult:
    best: Estimate | None
    near_best: list[Estimate] = field(default_factory=list)
    """Phase-2 candidates (within tolerance of the best pool time)."""
    evaluated: int = 0
    feasible: int = 0
    rejected: Counter = field(default_factory=Counter)
    closest_rejection: MemoryReport | None = None
    elapsed_s: float = 0.0

    def why_none(self) -> str:
        if self.closest_rejection is not None:
            return f"no AF-Pipe layout fits in memory; the closest: {self.closest_rejection.reason()}"
        return "no AF-Pipe layout is valid for this cluster and batch: " + ", ".join(
            f"{n} x {r}" for r, n in self.rejected.most_common(3))


def _placements(costs: ModelCosts, a: int, f: int, edp: int) -> list[tuple[str, float]]:
    c = costs.cluster
    out = [("own-nic", 0.0)] if edp == 1 else []
    if c.nodes > 1 and a % c.nodes == 0 and f % c.nodes == 0 and c.nodes % edp == 0:
        if edp == c.nodes:  # all attention<->expert traffic stays in the node: one share will do
            out.append(("shared-nic", a / (a + f)))
        else:
            out += [("shared-nic", s) for s in NIC_SHARES]
    return out


def af_layouts(costs: ModelCosts, global_batch: int, max_microbatches: int = 64, replication: bool = True):
    """Candidate layouts (``max_in_flight`` set to m; the search lowers it). Expert
    replication edp > 1 is tried for edp dividing the node count (``replication``)."""
    c = costs.cluster
    n, num_layers, num_experts = c.num_gpus, costs.args.n_layers, costs.num_experts
    replicas = [r for r in divisors(c.nodes) if r == 1 or replication]
    for p in divisors(num_layers):
        for edp in replicas:
            for ep in divisors(num_experts):
                f = p * edp * ep
                a = n - f
                if a < p or a % p or (a // p) % edp:
                    continue
                local = local_batch(global_batch, a // p)
                placements = _placements(costs, a, f, edp)
                for m in divisors(local):
                    if m > max_microbatches:
                        break
                    for placement, share in placements:
                        for recompute in (False, True):
                            yield AFLayout(a, f, p, m, m, placement, share, recompute, edp)


def search_af_pipe(costs: ModelCosts, global_batch: int, policy: MemoryPolicy | None = None,
                   tolerance: float = 0.01, max_microbatches: int = 64, replication: bool = True) -> SearchResult:
    """Two-phase search (module docstring). ``best`` is None when nothing fits."""
    policy = policy or MemoryPolicy.for_elem(costs.cluster.elem_bytes)
    start = time.perf_counter()
    result = SearchResult(None)
    estimates: list[Estimate] = []
    excess = float("inf")
    for lay in af_layouts(costs, global_batch, max_microbatches, replication):
        result.evaluated += 1
        if costs.args.n_layers < lay.pipeline_depth:
            result.rejected["p > layers"] += 1
            continue
        t = local_batch(global_batch, lay.dp) // lay.microbatches * costs.seq_len
        k_fit = max_in_flight_that_fits(costs, lay, policy, t)
        if k_fit < 1:
            result.rejected["memory"] += 1
            report = af_memory(costs, lay, policy, t, 1)
            if report.bytes_needed - report.bytes_available < excess:
                excess, result.closest_rejection = report.bytes_needed - report.bytes_available, report
            continue
        lay = replace(lay, max_in_flight=k_fit)
        estimates.append(estimate_af_pipe(costs, lay, global_batch, policy, auto_in_flight=True))
    result.feasible = len(estimates)
    if estimates:
        # Phase 1: the slower pool's busy time, per token so that layouts whose rounded
        # global batch differs compare fairly.
        best_pool = min(e.pool_time / e.tokens_per_step for e in estimates)
        result.near_best = [e for e in estimates if e.pool_time / e.tokens_per_step <= best_pool * (1 + tolerance)]
        # Phase 2: highest MFU; ties go to no recomputation, then fewer in flight (memory).
        result.best = max(result.near_best, key=lambda e: (round(e.mfu, 6), not e.layout["recompute"],
                                                            -e.layout["max_in_flight"]))
    result.elapsed_s = time.perf_counter() - start
    return result


@dataclass
class Plan:
    model: str
    seq_len: int
    global_batch: int
    costs: ModelCosts
    af: SearchResult
    baselines: dict[str, Estimate | None]

    @property
    def recommended(self) -> Estimate | None:
        return self.af.best

    def speedup(self) -> dict[str, float | None]:
        """AF-Pipe tokens/s/GPU over each baseline's (None where either does not fit)."""
        rec = self.recommended
        return {name: (rec.tokens_per_second_per_gpu / b.tokens_per_second_per_gpu if rec and b else None)
                for name, b in self.baselines.items()}


def plan(costs: ModelCosts, global_batch: int | None = None, policy: MemoryPolicy | None = None,
         model: str = "", dedup: str = "copy", tolerance: float = 0.01, replication: bool = True) -> Plan:
    """Recommend an AF-Pipe layout and predict the baselines on the same cluster."""
    batch = global_batch or default_global_batch(costs.cluster.num_gpus, costs.seq_len)
    af = search_af_pipe(costs, batch, policy, tolerance, replication=replication)
    baselines = {name: best_baseline(name, costs, batch, policy, dedup) for name in BASELINES}
    return Plan(model, costs.seq_len, batch, costs, af, baselines)

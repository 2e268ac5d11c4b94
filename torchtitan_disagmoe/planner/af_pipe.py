"""Analytic step time of one AF-Pipe layout (DESIGN.md section 2).

For one micro-batch, attention group g (each of its dp = A/p ranks holds t tokens) and
expert group g (edp replicas of ep ranks; a replica serves dp/edp attention ranks and
runs all their tokens at once: a "wave") do

    C_A(g) = sum over owned layers of A-stage fwd + bwd (+ head on group L mod p)
    C_F(g) = sum over owned MoE layers of expert fwd + bwd on (dp/edp) t K / ep copies
    N_A(g), N_F(g) = bytes of dispatch / combine / their gradients (and the residual
                     hand-off when p > 1) over the rank's share of the links

Compute and transfers run on separate streams, so a group's time per micro-batch is
``overlapped(C, N)`` = max(C (+ SM tax), N). With m micro-batches and at most k in flight:

    T_pool = m * max_g overlapped(C, N) / min(1, k / k_need),
    k_need = ceil(p * (c_a + c_f + x) / max(c_a, c_f))

(c_a, c_f, x: one layer's A-stage, F-stage and transfer time for one micro-batch, x with
the messages' latency; a micro-batch must travel the 2p-group ring before a group sees
it again. Latency delays a transfer's consumer but does not occupy the link.) The step adds
the fill and drain of the ring, after DESIGN.md's (PP-1)/(2v) [max(T_a, T_f) + T_M2N] with
PP = 2p groups and T per group-stage of v layers:

    bubble = (2p - 1) / 2 * (max(c_a, c_f) + x),

then the exposed part of the gradient reductions (attention parameters over dp, expert
parameters over edp; the part longer than the last micro-batch's backward) and the
optimizer step.

Placement: ``own-nic`` (ranks laid out as DisaggDims does, attention pool first; each GPU
uses its own NIC; all attention<->expert traffic crosses nodes when nodes > 1) or
``shared-nic`` (every node hosts A/nodes attention and F/nodes expert GPUs, which share
the node's NICs through NVLink relays, the fraction ``nic_share`` for attention-pool
traffic: the "division of network bandwidth between the pools"). With shared-nic, a
replica of an expert group spans nodes/edp nodes, so a fraction edp/nodes of the traffic
stays on NVLink. Expert replication (edp > 1) is the ("edp", "ep") F-group mesh of
DESIGN.md section 3, run as ``disagmoe.expert_replicas = edp`` (full copies, not sharded
over edp: each replica keeps its experts' whole optimizer state, as memory.py counts).
"""

import math
from dataclasses import asdict, dataclass, replace

from .cost import ModelCosts
from .estimate import (
    Estimate,
    GroupLayers,
    grad_sync_time,
    group_layers,
    local_batch,
    mfu,
    optimizer_time,
    unique_groups,
)
from .memory import (
    MemoryPolicy,
    MemoryReport,
    attention_act_per_token,
    available,
    expert_act,
    head_transient,
    worst,
)


@dataclass(frozen=True)
class AFLayout:
    attention_gpus: int
    expert_gpus: int
    pipeline_depth: int
    microbatches: int
    max_in_flight: int
    placement: str = "own-nic"
    nic_share: float = 0.0
    """Attention pool's share of each node's NIC bandwidth (``shared-nic`` only)."""
    recompute: bool = False
    expert_replicas: int = 1
    """edp: copies of each expert group (1: every expert on exactly one rank)."""

    @property
    def dp(self) -> int:
        return self.attention_gpus // self.pipeline_depth

    @property
    def ep(self) -> int:
        return self.expert_gpus // (self.pipeline_depth * self.expert_replicas)

    def validate(self, num_layers: int, num_experts: int, global_batch: int) -> None:
        """Raise ValueError for a layout the runtime or the batch cannot run."""
        a, f, p, m, r = (self.attention_gpus, self.expert_gpus, self.pipeline_depth, self.microbatches,
                         self.expert_replicas)
        if min(a, f, p, m, r) < 1:
            raise ValueError(f"layout {self} has a non-positive size")
        if a % p or f % (p * r) or num_layers % p:
            raise ValueError(f"pipeline_depth {p} must divide attention {a} GPUs and {num_layers} layers, "
                             f"and pipeline_depth x expert_replicas {p * r} the expert {f} GPUs")
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts cannot be split over {self.ep} ranks per expert group")
        if self.dp % r:
            raise ValueError(f"expert_replicas {r} must divide the {self.dp} ranks of an attention group")
        if local_batch(global_batch, self.dp) % m:
            raise ValueError(f"{m} micro-batches do not divide the {local_batch(global_batch, self.dp)} sequences "
                             f"of each of the {self.dp} data-parallel ranks")
        if not 1 <= self.max_in_flight <= m:
            raise ValueError(f"max_in_flight {self.max_in_flight} must be in [1, microbatches {m}]")


@dataclass(frozen=True)
class _Links:
    a_bw: float
    f_bw: float
    """Inter-node bandwidth available to one attention / expert rank."""
    remote: float
    """Fraction of attention<->expert bytes that leave the node."""
    residual_remote: float


def links(costs: ModelCosts, lay: AFLayout) -> _Links:
    c = costs.cluster
    if c.nodes == 1:
        return _Links(c.inter_bw, c.inter_bw, 0.0, 0.0)
    if lay.placement == "shared-nic":
        node_bw = c.gpus_per_node * c.inter_bw
        a_n, f_n = lay.attention_gpus / c.nodes, lay.expert_gpus / c.nodes
        remote = 1 - lay.expert_replicas / c.nodes
        return _Links(lay.nic_share * node_bw / a_n, (1 - lay.nic_share) * node_bw / f_n, remote, 0.0)
    return _Links(c.inter_bw, c.inter_bw, 1.0, 1.0 if lay.dp >= c.gpus_per_node else 0.0)


def _link_time(costs: ModelCosts, out_b: float, in_b: float, bw: float, remote: float) -> float:
    """Link occupancy: the busier direction (full duplex); latency is not occupancy, it
    only delays the consumer (``_chain_latency``)."""
    busiest = max(out_b, in_b)
    return costs.link_time(busiest * (1 - remote), busiest * remote, 0, inter_bw=bw)


MESSAGES_PER_MOE_LAYER = 6
"""On one micro-batch's chain through a MoE layer: dispatch and combine (row counts, then
payload: 2 messages each), combine-grad and dispatch-grad (1 each)."""


def _chain_latency(costs: ModelCosts, ln: "_Links", p: int) -> float:
    c = costs.cluster
    latency = c.intra_latency if c.nodes == 1 or ln.remote == 0 else c.inter_latency
    return (MESSAGES_PER_MOE_LAYER + (2 if p > 1 else 0)) * latency


def _attention_group(costs: ModelCosts, grp: GroupLayers, lay: AFLayout, t: float, ln: _Links):
    """(compute fwd, compute bwd, network) of one attention rank for one micro-batch."""
    fwd = bwd = 0.0
    for lc, n in grp.layers:
        f, b = costs.attention_stage(lc, t, lay.recompute)
        fwd, bwd = fwd + n * f, bwd + n * b
    if grp.head:
        f, b = costs.head_stage(t, lay.recompute)
        fwd, bwd = fwd + f, bwd + b
    a_out, a_in = costs.af_bytes_per_token(lay.ep)
    net = _link_time(costs, grp.num_moe * t * a_out, grp.moe_in * t * a_in, ln.a_bw, ln.remote)
    if lay.pipeline_depth > 1:  # residual in and out, forward and backward
        hand = (grp.num_layers + grp.head) * t * costs.residual_row
        net += _link_time(costs, hand, hand, ln.a_bw, ln.residual_remote)
    return fwd, bwd, net


def _expert_load(costs: ModelCosts, lay: AFLayout, t: float) -> tuple[float, float]:
    """(rows, routed copies) one expert rank receives per MoE layer and micro-batch."""
    senders = lay.dp // lay.expert_replicas
    rows = senders * t * costs.distinct_ranks(lay.ep) / lay.ep
    copies = senders * t * costs.top_k * costs.routing.imbalance(lay.ep) / lay.ep
    return rows, copies


def _expert_group(costs: ModelCosts, grp: GroupLayers, lay: AFLayout, t: float, ln: _Links):
    """(compute fwd, compute bwd, network) of one expert rank for one micro-batch."""
    rows, copies = _expert_load(costs, lay, t)
    f, b = costs.expert_stage(copies, costs.num_experts // lay.ep, lay.recompute)
    n = grp.num_moe
    out_b = n * rows * (costs.combine_row + costs.dispatch_grad_row)
    in_b = n * rows * (costs.dispatch_row + costs.combine_grad_row)
    return n * f, n * b, _link_time(costs, out_b, in_b, ln.f_bw, ln.remote)


def _attention_params(costs: ModelCosts, grp: GroupLayers) -> float:
    params = sum(lc.a_params * n for lc, n in grp.layers)
    return params + (costs.head_params if grp.head else 0) + (costs.embed_params if grp.embedding else 0)


def _expert_params(costs: ModelCosts, grp: GroupLayers, lay: AFLayout) -> float:
    return grp.num_moe * (costs.num_experts // lay.ep) * costs.expert_params


def _memory_terms(costs: ModelCosts, lay: AFLayout, policy: MemoryPolicy, t: float):
    """(what, static bytes, bytes per micro-batch in flight) for each distinct rank kind."""
    out = []
    for g, grp in unique_groups(group_layers(costs, lay.pipeline_depth)):
        static = policy.state_bytes(_attention_params(costs, grp), lay.dp)
        static += head_transient(costs, t) if grp.head else 0.0
        per_mb = sum(n * t * attention_act_per_token(costs, lc, lay.recompute) for lc, n in grp.layers)
        out.append((f"attention group {g}", static, per_mb))
        if grp.num_moe:
            rows, copies = _expert_load(costs, lay, t)
            static = policy.state_bytes(_expert_params(costs, grp, lay), lay.expert_replicas)
            out.append((f"expert group {g}", static, grp.num_moe * expert_act(costs, rows, copies, lay.recompute)))
    return out


def af_memory(costs: ModelCosts, lay: AFLayout, policy: MemoryPolicy, t: float, k: int) -> MemoryReport:
    return worst([MemoryReport(static + k * per_mb, available(costs, policy), what)
                  for what, static, per_mb in _memory_terms(costs, lay, policy, t)])


def max_in_flight_that_fits(costs: ModelCosts, lay: AFLayout, policy: MemoryPolicy, t: float) -> int:
    """Largest k (micro-batches in flight, at most m) whose activations fit; 0: none."""
    best = lay.microbatches
    for _, static, per_mb in _memory_terms(costs, lay, policy, t):
        room = available(costs, policy) - static
        best = min(best, int(room // per_mb) if per_mb > 0 else (best if room >= 0 else 0))
    return max(best, 0)


def estimate_af_pipe(costs: ModelCosts, lay: AFLayout, global_batch: int,
                     policy: MemoryPolicy | None = None, auto_in_flight: bool = False) -> Estimate:
    """Predicted step of one AF-Pipe layout (see the module docstring).

    With ``auto_in_flight`` the layout's ``max_in_flight`` is an upper bound (e.g. what
    memory allows) and the estimate uses min(bound, k_need): no more in flight than
    keeps both pools busy.
    """
    policy = policy or MemoryPolicy.for_elem(costs.cluster.elem_bytes)
    p, m, k = lay.pipeline_depth, lay.microbatches, lay.max_in_flight
    local = local_batch(global_batch, lay.dp)
    t = local // m * costs.seq_len
    ln = links(costs, lay)
    v = costs.args.n_layers // p
    a_worst = f_worst = c_a = c_f = x = grad = opt = 0.0
    for _, grp in unique_groups(group_layers(costs, p)):
        fwd, bwd, net = _attention_group(costs, grp, lay, t, ln)
        a_worst = max(a_worst, costs.overlapped(fwd + bwd, net))
        c_a, x = max(c_a, (fwd + bwd) / v), max(x, net / v)
        params = _attention_params(costs, grp)
        grad = max(grad, grad_sync_time(costs, params, lay.dp, policy, ln.a_bw) - bwd)
        opt = max(opt, optimizer_time(costs, params, lay.dp, policy))
        if grp.num_moe:
            ffwd, fbwd, fnet = _expert_group(costs, grp, lay, t, ln)
            f_worst = max(f_worst, costs.overlapped(ffwd + fbwd, fnet))
            c_f, x = max(c_f, (ffwd + fbwd) / grp.num_moe), max(x, fnet / grp.num_moe)
            params = _expert_params(costs, grp, lay)
            grad = max(grad, grad_sync_time(costs, params, lay.expert_replicas, policy, ln.f_bw) - fbwd)
            opt = max(opt, optimizer_time(costs, params, lay.expert_replicas, policy))
    x += _chain_latency(costs, ln, p)
    k_need = math.ceil(p * (c_a + c_f + x) / max(c_a, c_f, 1e-30))
    if auto_in_flight:
        k = min(k, k_need)
        lay = replace(lay, max_in_flight=k)
    slowdown = 1 / min(1.0, k / k_need)
    t_a, t_f = m * a_worst * slowdown, m * f_worst * slowdown
    pool = max(t_a, t_f)
    bubble = (2 * p - 1) / 2 * (max(c_a, c_f) + x)
    step = pool + bubble + max(grad, 0.0) + opt
    tokens = lay.dp * local * costs.seq_len
    n = lay.attention_gpus + lay.expert_gpus
    breakdown = {"attention_pool_s": t_a, "expert_pool_s": t_f, "bubble_s": bubble,
                 "grad_sync_exposed_s": max(grad, 0.0), "optimizer_s": opt, "k_need": k_need,
                 "tokens_per_microbatch": t, "busy_attention": m * a_worst / step, "busy_expert": m * f_worst / step,
                 "global_batch": lay.dp * local}
    return Estimate("af_pipe", step, tokens, n, mfu(costs, tokens, step, n), asdict(lay), pool,
                    af_memory(costs, lay, policy, t, k), breakdown)


@dataclass(frozen=True)
class PoolLoad:
    """What one rank of a pool does per micro-batch (its busiest group), for the roofline."""

    flops: float
    net_bytes: float
    """Bytes in the busier direction over the binding link (the NIC, or NVLink when the
    NVLink share takes longer, e.g. with node-local expert replicas)."""
    bandwidth: float
    """That link's bandwidth for this rank (bytes/s, before efficiency)."""
    link: str
    time: float
    """overlapped(compute, transfers) per micro-batch."""


def _binding(costs: ModelCosts, nbytes: float, remote: float, bw: float) -> tuple[float, float, str]:
    c = costs.cluster
    local, far = nbytes * (1 - remote), nbytes * remote
    if local / c.intra_bw >= far / bw:
        return local, c.intra_bw, "NVLink"
    return far, bw, "NIC"


def pool_loads(costs: ModelCosts, lay: AFLayout, global_batch: int) -> dict[str, PoolLoad]:
    """Per-pool FLOPs, network bytes and bandwidth of one micro-batch (busiest group)."""
    t = local_batch(global_batch, lay.dp) // lay.microbatches * costs.seq_len
    ln = links(costs, lay)
    a_out, a_in = costs.af_bytes_per_token(lay.ep)
    rows, copies = _expert_load(costs, lay, t)
    f_row = max(costs.combine_row + costs.dispatch_grad_row, costs.dispatch_row + costs.combine_grad_row)
    out: dict[str, PoolLoad] = {}
    for _, grp in unique_groups(group_layers(costs, lay.pipeline_depth)):
        flops = 3 * t * sum(n * (lc.gemm_flops + lc.attn_flops) for lc, n in grp.layers)
        flops += 3 * t * costs.head_flops if grp.head else 0.0
        nbytes = max(grp.num_moe * t * a_out, grp.moe_in * t * a_in)
        fwd, bwd, tnet = _attention_group(costs, grp, lay, t, ln)
        load = PoolLoad(flops, *_binding(costs, nbytes, ln.remote, ln.a_bw), costs.overlapped(fwd + bwd, tnet))
        if "attention" not in out or load.time > out["attention"].time:
            out["attention"] = load
        if grp.num_moe:
            flops = grp.num_moe * 3 * copies * 2 * costs.expert_params
            fwd, bwd, tnet = _expert_group(costs, grp, lay, t, ln)
            load = PoolLoad(flops, *_binding(costs, grp.num_moe * rows * f_row, ln.remote, ln.f_bw),
                            costs.overlapped(fwd + bwd, tnet))
            if "expert" not in out or load.time > out["expert"].time:
                out["expert"] = load
    return out

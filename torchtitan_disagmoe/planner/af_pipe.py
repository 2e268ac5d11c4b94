"""Analytic step time of one AF-Pipe layout (DESIGN.md section 2).

For one micro-batch, attention group g (each of its dp = A/p ranks holds t tokens) and
expert group g (ep = F/p ranks, receiving the tokens of the whole A group: a "wave") do

    C_A(g) = sum over owned layers of A-stage fwd + bwd (+ head on group L mod p)
    C_F(g) = sum over owned MoE layers of expert fwd + bwd on dp*t*K/ep routed copies
    N_A(g), N_F(g) = bytes of dispatch / combine / their gradients (and the residual
                     hand-off when p > 1) over the rank's share of network bandwidth

Compute and transfers run on separate streams, so a group's time per micro-batch is
``overlapped(C, N)`` = max(C (+ SM tax), N). With m micro-batches and at most k in flight:

    T_pool = m * max_g overlapped(C, N) / min(1, k / k_need),
    k_need = ceil(p * (c_a + c_f + x) / max(c_a, c_f))

(c_a, c_f, x: one layer's A-stage, F-stage and transfer time for one micro-batch; a
micro-batch must travel the 2p-group ring before a group sees it again.) The step adds
the fill and drain of the ring, after DESIGN.md's (PP-1)/(2v) [max(T_a, T_f) + T_M2N] with
PP = 2p groups and T per group-stage of v layers:

    bubble = (2p - 1) / 2 * (max(c_a, c_f) + x),

then the exposed part of the attention pool's gradient reduction (the part longer than
the last micro-batch's backward) and the optimizer step.

Network placement: ``own-nic`` (each GPU uses its NIC; ranks laid out as DisaggDims does,
attention pool first) or ``shared-nic`` (every node hosts A/nodes attention and F/nodes
expert GPUs, which share the node's NICs through NVLink relays, a fraction ``nic_share``
for attention traffic: the "division of network bandwidth between the pools").
"""

import math
from dataclasses import asdict, dataclass

from .cost import ModelCosts
from .estimate import Estimate, GroupLayers, group_layers, mfu, unique_groups
from .memory import (MemoryPolicy, MemoryReport, attention_act_per_token, available, expert_act,
                     head_transient, worst)


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

    def validate(self, num_layers: int, num_experts: int, global_batch: int) -> None:
        """Raise ValueError for a layout the runtime (DisaggDims) or the batch cannot run."""
        a, f, p, m = self.attention_gpus, self.expert_gpus, self.pipeline_depth, self.microbatches
        if a < 1 or f < 1 or p < 1 or m < 1:
            raise ValueError(f"layout {self} has a non-positive size")
        if a % p or f % p or num_layers % p:
            raise ValueError(f"pipeline_depth {p} must divide attention {a}, expert {f} GPUs and {num_layers} layers")
        if num_experts % (f // p):
            raise ValueError(f"{num_experts} experts cannot be split over {f // p} ranks per expert group")
        if global_batch % ((a // p) * m):
            raise ValueError(f"global batch {global_batch} is not divisible by dp {a // p} x {m} micro-batches")
        if not 1 <= self.max_in_flight <= m:
            raise ValueError(f"max_in_flight {self.max_in_flight} must be in [1, microbatches {m}]")


@dataclass(frozen=True)
class _Bandwidth:
    a_inter: float
    f_inter: float
    remote_share: float
    """Fraction of attention<->expert bytes that leave the node."""


def _bandwidth(costs: ModelCosts, lay: AFLayout) -> _Bandwidth:
    c = costs.cluster
    if c.nodes == 1:
        return _Bandwidth(c.inter_bw, c.inter_bw, 0.0)
    if lay.placement == "shared-nic":
        node_bw = c.gpus_per_node * c.inter_bw
        a_n, f_n = lay.attention_gpus / c.nodes, lay.expert_gpus / c.nodes
        return _Bandwidth(lay.nic_share * node_bw / a_n, (1 - lay.nic_share) * node_bw / f_n, 1 - 1 / c.nodes)
    return _Bandwidth(c.inter_bw, c.inter_bw, 1.0)


def _net(costs: ModelCosts, out_b: float, in_b: float, bw: float, remote: float, messages: float) -> float:
    busiest = max(out_b, in_b)
    return costs.link_time(busiest * (1 - remote), busiest * remote, messages, inter_bw=bw)


def _attention_group(costs: ModelCosts, grp: GroupLayers, lay: AFLayout, t: float, bw: _Bandwidth):
    """(compute fwd, compute bwd, network) of one attention group for one micro-batch."""
    fwd = bwd = 0.0
    for lc, n in grp.layers:
        f, b = costs.attention_stage(lc, t, lay.recompute)
        fwd, bwd = fwd + n * f, bwd + n * b
    if grp.head:
        f, b = costs.head_stage(t, lay.recompute)
        fwd, bwd = fwd + f, bwd + b
    ep = lay.expert_gpus // lay.pipeline_depth
    a_out, a_in = costs.af_bytes_per_token(ep)
    out_b, in_b = grp.num_moe * t * a_out, grp.moe_in * t * a_in
    messages = 6 * grp.num_moe  # dispatch (+ counts), combine (+ counts), two gradients
    if lay.pipeline_depth > 1:  # residual hand-off in and out, forward and backward
        hand = (grp.num_layers + grp.head) * t * costs.residual_row
        out_b, in_b = out_b + hand, in_b + hand
        messages += 2 * (grp.num_layers + grp.head)
    return fwd, bwd, _net(costs, out_b, in_b, bw.a_inter, bw.remote_share, messages)


def _expert_group(costs: ModelCosts, grp: GroupLayers, lay: AFLayout, t: float, bw: _Bandwidth):
    """(compute fwd, compute bwd, network, rows, copies) of one expert rank, one micro-batch."""
    p = lay.pipeline_depth
    dp, ep = lay.attention_gpus // p, lay.expert_gpus // p
    rows = dp * t * costs.distinct_ranks(ep) / ep
    copies = dp * t * costs.top_k * costs.routing.imbalance(ep) / ep
    f, b = costs.expert_stage(copies, costs.num_experts // ep, lay.recompute)
    n = grp.num_moe
    out_b = n * rows * (costs.combine_row + costs.dispatch_grad_row)
    in_b = n * rows * (costs.dispatch_row + costs.combine_grad_row)
    net = _net(costs, out_b, in_b, bw.f_inter, bw.remote_share, 6 * n)
    return n * f, n * b, net, rows, copies


def _attention_params(costs: ModelCosts, grp: GroupLayers) -> float:
    params = sum(lc.a_params * n for lc, n in grp.layers)
    return params + (costs.head_params if grp.head else 0) + (costs.embed_params if grp.embedding else 0)


def af_memory(costs: ModelCosts, lay: AFLayout, policy: MemoryPolicy, t: float, k: int) -> MemoryReport:
    p = lay.pipeline_depth
    groups = group_layers(costs, p)
    dp, ep = lay.attention_gpus // p, lay.expert_gpus // p
    reports = []
    for g, grp in unique_groups(groups):
        static, per_mb = _attention_static_and_act(costs, grp, policy, dp, t, lay.recompute)
        reports.append(MemoryReport(static + k * per_mb, available(costs, policy), f"attention group {g}"))
        static, per_mb = _expert_static_and_act(costs, grp, lay, policy, t)
        if grp.num_moe:
            reports.append(MemoryReport(static + k * per_mb, available(costs, policy), f"expert group {g}"))
    return worst(reports)


def _attention_static_and_act(costs, grp, policy, dp, t, recompute):
    static = policy.state_bytes(_attention_params(costs, grp), dp)
    static += head_transient(costs, t) if grp.head else 0.0
    per_mb = sum(n * t * attention_act_per_token(costs, lc, recompute) for lc, n in grp.layers)
    return static, per_mb


def _expert_static_and_act(costs, grp, lay, policy, t):
    p = lay.pipeline_depth
    dp, ep = lay.attention_gpus // p, lay.expert_gpus // p
    static = policy.state_bytes(grp.num_moe * (costs.num_experts // ep) * costs.expert_params, 1)
    rows = dp * t * costs.distinct_ranks(ep) / ep
    copies = dp * t * costs.top_k * costs.routing.imbalance(ep) / ep
    return static, grp.num_moe * expert_act(costs, rows, copies, lay.recompute)


def max_in_flight_that_fits(costs: ModelCosts, lay: AFLayout, policy: MemoryPolicy, t: float) -> int:
    """Largest k (micro-batches in flight) whose activations fit next to the weights; 0: none."""
    p = lay.pipeline_depth
    dp = lay.attention_gpus // p
    best = lay.microbatches
    for _, grp in unique_groups(group_layers(costs, p)):
        pairs = [_attention_static_and_act(costs, grp, policy, dp, t, lay.recompute)]
        if grp.num_moe:
            pairs.append(_expert_static_and_act(costs, grp, lay, policy, t))
        for static, per_mb in pairs:
            room = available(costs, policy) - static
            best = min(best, int(room // per_mb) if per_mb > 0 else best)
    return max(best, 0)


def estimate_af_pipe(costs: ModelCosts, lay: AFLayout, global_batch: int,
                     policy: MemoryPolicy | None = None) -> Estimate:
    """Predicted step of one AF-Pipe layout (see the module docstring)."""
    policy = policy or MemoryPolicy.for_elem(costs.cluster.elem_bytes)
    p, m, k = lay.pipeline_depth, lay.microbatches, lay.max_in_flight
    dp = lay.attention_gpus // p
    seq = costs.seq_len
    t = global_batch // (dp * m) * seq
    bw = _bandwidth(costs, lay)
    v = costs.args.n_layers // p
    a_worst = f_worst = c_a = c_f = x = 0.0
    grad_exposed = opt = 0.0
    for _, grp in unique_groups(group_layers(costs, p)):
        fwd, bwd, net = _attention_group(costs, grp, lay, t, bw)
        a_worst = max(a_worst, costs.overlapped(fwd + bwd, net))
        c_a, x = max(c_a, (fwd + bwd) / v), max(x, net / v)
        params = _attention_params(costs, grp)
        grad_exposed = max(grad_exposed, _grad_sync(costs, params, dp, policy, bw.a_inter) - bwd)
        opt = max(opt, _optimizer_time(costs, params, dp, policy))
        if grp.num_moe:
            ffwd, fbwd, fnet, _, _ = _expert_group(costs, grp, lay, t, bw)
            f_worst = max(f_worst, costs.overlapped(ffwd + fbwd, fnet))
            c_f, x = max(c_f, (ffwd + fbwd) / grp.num_moe), max(x, fnet / grp.num_moe)
            opt = max(opt, _optimizer_time(costs, grp.num_moe * costs.num_experts // (lay.expert_gpus // p)
                                           * costs.expert_params, 1, policy))
    k_need = math.ceil(p * (c_a + c_f + x) / max(c_a, c_f, 1e-30))
    slowdown = 1 / min(1.0, k / k_need)
    t_a, t_f = m * a_worst * slowdown, m * f_worst * slowdown
    pool = max(t_a, t_f)
    bubble = (2 * p - 1) / 2 * (max(c_a, c_f) + x)
    step = pool + bubble + max(grad_exposed, 0.0) + opt
    tokens = global_batch * seq
    memory = af_memory(costs, lay, policy, t, k)
    breakdown = {"attention_pool_s": t_a, "expert_pool_s": t_f, "bubble_s": bubble,
                 "grad_sync_exposed_s": max(grad_exposed, 0.0), "optimizer_s": opt, "k_need": k_need,
                 "tokens_per_microbatch": t, "busy_attention": t_a / step, "busy_expert": t_f / step}
    return Estimate("af_pipe", step, tokens, lay.attention_gpus + lay.expert_gpus,
                    mfu(costs, tokens, step, lay.attention_gpus + lay.expert_gpus),
                    asdict(lay), pool, memory, breakdown)


def _grad_sync(costs: ModelCosts, params: float, replicas: int, policy: MemoryPolicy, bw: float) -> float:
    """Ring reduce-scatter + all-gather (= all-reduce volume) of fp32 gradients."""
    if replicas <= 1:
        return 0.0
    c = costs.cluster
    volume = 2 * (replicas - 1) / replicas * params * policy.grad_bytes
    inter = replicas > c.gpus_per_node and c.nodes > 1
    return costs.link_time(0.0 if inter else volume, volume if inter else 0.0, 2 * (replicas - 1), inter_bw=bw)


def _optimizer_time(costs: ModelCosts, params: float, shards: int, policy: MemoryPolicy) -> float:
    """Adam step: memory-bound, reads and writes the optimizer shard and the weights."""
    c = costs.cluster
    per_param = 2 * (policy.optimizer_bytes + policy.grad_bytes) / shards + 2 * policy.weight_bytes
    return params * per_param / (c.hbm_bw * costs.eff.hbm)

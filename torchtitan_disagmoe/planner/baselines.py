"""Colocated expert-parallel baselines, each with its own best layout on the same cluster.

Every GPU holds attention (data parallel over DP = N / PP ranks, optimizer sharded over
them) and E / EP experts of each MoE layer of its pipeline stage (experts replicated
EDP = DP / EP times). Per micro-batch (t tokens per rank) and pipeline stage:

    C_attn, C_exp  attention-side and expert compute, fwd + bwd, from ``cost``;
    X              the four all-to-alls of each MoE layer (dispatch, combine, gradients),
                   intra-node over NVLink, inter-node over the NIC;
    P              the pipeline hand-off (t D elem each way).

- ``ep_1f1b_interleaved`` (Megatron-LM: EP + interleaved 1F1B PP, all-to-all on the
  critical path): T = C_attn + C_exp + X + P, step = (m + (PP - 1) / v) * T.
- ``ep_overlap`` (idealised intra-layer overlap, Tutel / Comet style): per MoE layer
  C_attn(l) + max(C_exp(l), X(l)) + eta * X(l). The attention of a layer produces the
  tokens its dispatch sends and consumes what its combine returns, so only the expert
  GEMMs can hide that layer's all-to-all; eta = ``Efficiency.intra_layer_exposed`` is the
  part chunking cannot hide. Same interleaved 1F1B bubble.
- ``dualpipe`` (DeepSeek-V3: a forward and a backward chunk of two micro-batches overlap,
  so all-to-all hides behind all compute): T = max(C_attn + C_exp, X + P), step = m * T +
  bubble, bubble = (PP/2 - 1) (F&B + B - 3W) (DeepSeek-V3 report, Table 2) with F&B = T,
  W = B / 2, plus one micro-batch's all-to-all that has nothing to overlap with (the first
  forward, the last backward). Two copies of the parameters when PP > 1; PP + 1
  micro-batches of activations.

The all-to-all sends every routed copy that leaves the rank (``dedup="copy"``, what
Megatron and torchtitan do); ``dedup="rank"`` gives the baselines AF-Pipe's
once-per-(token, rank) rule.
"""

from dataclasses import asdict, dataclass

from .cost import ModelCosts
from .estimate import (
    Estimate,
    GroupLayers,
    divisors,
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

BASELINES = ("ep_1f1b_interleaved", "ep_overlap", "dualpipe")


@dataclass(frozen=True)
class EPLayout:
    pipeline_parallel: int
    virtual_stages: int
    expert_parallel: int
    microbatches: int
    recompute: bool = False
    dedup: str = "copy"


def _stage_terms(costs: ModelCosts, grp: GroupLayers, lay: EPLayout, t: float):
    """Per micro-batch: attention compute, expert compute, all-to-all time, and per MoE
    layer (C_attn, C_exp, X) triples for the intra-layer overlap."""
    ep = lay.expert_parallel
    intra, inter = costs.ep_a2a_bytes_per_token(ep, lay.dedup)
    # full recomputation re-runs the layer, forward all-to-alls included (half the bytes)
    scale = 1.5 if lay.recompute else 1.0
    x_layer = costs.link_time(scale * intra * t, scale * inter * t, messages=8 * scale) if ep > 1 else 0.0
    c_attn = c_exp = x = bwd = 0.0
    per_layer = []
    for lc, n in grp.layers:
        (af, ab), (ef, eb) = costs.colocated_layer(lc, t, ep, lay.recompute)
        c_attn, c_exp, bwd = c_attn + n * (af + ab), c_exp + n * (ef + eb), bwd + n * (ab + eb)
        if lc.moe:
            x += n * x_layer
        per_layer.append((n, af + ab, ef + eb, x_layer if lc.moe else 0.0))
    if grp.head:
        hf, hb = costs.head_stage(t, lay.recompute)
        c_attn, bwd = c_attn + hf + hb, bwd + hb
        per_layer.append((1, hf + hb, 0.0, 0.0))
    return c_attn, c_exp, x, bwd, per_layer


def _p2p(costs: ModelCosts, lay: EPLayout, t: float) -> float:
    if lay.pipeline_parallel == 1:
        return 0.0
    c = costs.cluster
    stage_ranks = c.num_gpus // lay.pipeline_parallel
    b = 2 * t * costs.residual_row  # per direction: activations forward, gradients backward
    inter = stage_ranks >= c.gpus_per_node and c.nodes > 1
    return costs.link_time(0.0 if inter else b, b if inter else 0.0, messages=4)


def _stage_time(scheme: str, costs: ModelCosts, c_attn, c_exp, x, per_layer, p2p) -> float:
    if scheme == "ep_1f1b_interleaved":
        return c_attn + c_exp + x + p2p
    if scheme == "ep_overlap":
        eta = costs.eff.intra_layer_exposed
        return sum(n * (a + costs.overlapped(e, xl) + eta * xl) for n, a, e, xl in per_layer) + p2p
    return costs.overlapped(c_attn + c_exp, x + p2p)


def _memory(scheme: str, costs: ModelCosts, lay: EPLayout, groups, policy: MemoryPolicy, t: float) -> MemoryReport:
    pp, v, m = lay.pipeline_parallel, lay.virtual_stages, lay.microbatches
    dp = costs.cluster.num_gpus // pp
    ep = lay.expert_parallel
    if scheme == "dualpipe":
        in_flight, copies_of_params = min(m, pp + 1), (2 if pp > 1 else 1)
    else:
        in_flight, copies_of_params = min(m, pp + (pp - 1) / v), 1
    reports = []
    for g, grp in unique_groups(groups):
        attn_params = sum(lc.a_params * n for lc, n in grp.layers)
        attn_params += (costs.head_params if grp.head else 0) + (costs.embed_params if grp.embedding else 0)
        expert_params = grp.num_moe * (costs.num_experts // ep) * costs.expert_params
        static = copies_of_params * (policy.state_bytes(attn_params, dp) + policy.state_bytes(expert_params, dp // ep))
        rows = t * costs.top_k * costs.routing.imbalance(ep)  # received copies, one row each
        act = sum(n * t * attention_act_per_token(costs, lc, lay.recompute) for lc, n in grp.layers)
        if not lay.recompute:  # recomputation keeps only the layer input (counted above)
            act += grp.num_moe * expert_act(costs, rows, rows, False)
        need = static + in_flight * act + (head_transient(costs, t) if grp.head else 0.0)
        reports.append(MemoryReport(need, available(costs, policy), f"{scheme} stage {g}"))
    return worst(reports)


def estimate_baseline(scheme: str, costs: ModelCosts, lay: EPLayout, global_batch: int,
                      policy: MemoryPolicy | None = None) -> Estimate:
    """Predicted step of one colocated EP layout under ``scheme`` (see module docstring)."""
    if scheme not in BASELINES:
        raise ValueError(f"baseline {scheme!r}; allowed: {list(BASELINES)}")
    policy = policy or MemoryPolicy.for_elem(costs.cluster.elem_bytes)
    c = costs.cluster
    pp, v, m = lay.pipeline_parallel, lay.virtual_stages, lay.microbatches
    dp = c.num_gpus // pp
    local = local_batch(global_batch, dp)
    t = local // m * costs.seq_len
    groups = group_layers(costs, pp, contiguous=True)
    p2p = _p2p(costs, lay, t)
    worst_stage = worst_bwd = worst_x = grad = opt = 0.0
    for _, grp in unique_groups(groups):
        c_attn, c_exp, x, bwd, per_layer = _stage_terms(costs, grp, lay, t)
        stage = _stage_time(scheme, costs, c_attn, c_exp, x, per_layer, p2p)
        if stage > worst_stage:
            worst_stage, worst_bwd, worst_x = stage, bwd, x + p2p
        grad = max(grad, _grad_exposed(costs, grp, lay, policy) - bwd)
        opt = max(opt, _optimizer(costs, grp, lay, policy))
    if scheme == "dualpipe":
        bubble = max(pp / 2 - 1, 0) * (worst_stage - 0.5 * worst_bwd) + worst_x
        pool = m * worst_stage
    else:
        pool = m * worst_stage
        bubble = (pp - 1) / v * worst_stage
    step = pool + bubble + max(grad, 0.0) + opt
    tokens = dp * local * costs.seq_len
    layout = {"attention_gpus": c.num_gpus, "expert_gpus": c.num_gpus, "pipeline_depth": pp,
              "microbatches": m, **asdict(lay)}
    breakdown = {"stage_s": worst_stage, "bubble_s": bubble, "grad_sync_exposed_s": max(grad, 0.0),
                 "optimizer_s": opt, "tokens_per_microbatch": t, "a2a_per_microbatch_s": worst_x}
    return Estimate(scheme, step, tokens, c.num_gpus, mfu(costs, tokens, step, c.num_gpus), layout, pool,
                    _memory(scheme, costs, lay, groups, policy, t), breakdown)


def _grad_exposed(costs: ModelCosts, grp: GroupLayers, lay: EPLayout, policy: MemoryPolicy) -> float:
    c = costs.cluster
    dp = c.num_gpus // lay.pipeline_parallel
    edp = dp // lay.expert_parallel
    attn_params = sum(lc.a_params * n for lc, n in grp.layers)
    expert_params = grp.num_moe * (costs.num_experts // lay.expert_parallel) * costs.expert_params
    return (grad_sync_time(costs, attn_params, dp, policy, c.inter_bw)
            + grad_sync_time(costs, expert_params, edp, policy, c.inter_bw))


def _optimizer(costs: ModelCosts, grp: GroupLayers, lay: EPLayout, policy: MemoryPolicy) -> float:
    dp = costs.cluster.num_gpus // lay.pipeline_parallel
    attn_params = sum(lc.a_params * n for lc, n in grp.layers)
    expert_params = grp.num_moe * (costs.num_experts // lay.expert_parallel) * costs.expert_params
    return optimizer_time(costs, attn_params, dp, policy) + optimizer_time(
        costs, expert_params, dp // lay.expert_parallel, policy)


def baseline_layouts(scheme: str, costs: ModelCosts, global_batch: int, dedup: str = "copy",
                     max_microbatches: int = 64):
    """Every EP layout the scheme can run on this cluster with this batch."""
    n, L, E = costs.cluster.num_gpus, costs.args.n_layers, costs.num_experts
    for pp in divisors(n):
        if pp > L:
            break
        dp = n // pp
        if scheme == "dualpipe" and pp > 1 and pp % 2:
            continue
        vs = [1] if scheme == "dualpipe" or pp == 1 else [v for v in range(1, 9) if L % (pp * v) == 0]
        for ep in divisors(dp):
            if E % ep:
                continue
            for m in divisors(local_batch(global_batch, dp)):
                if m > max_microbatches:
                    break
                if scheme == "dualpipe" and pp > 1 and (m < pp or m % 2):
                    continue
                for v in vs:
                    if v > 1 and m % pp:
                        continue
                    for recompute in (False, True):
                        yield EPLayout(pp, v, ep, m, recompute, dedup)


def best_baseline(scheme: str, costs: ModelCosts, global_batch: int, policy: MemoryPolicy | None = None,
                  dedup: str = "copy") -> Estimate | None:
    """The fastest layout of ``scheme`` that fits in memory (None when none fits)."""
    best = None
    for lay in baseline_layouts(scheme, costs, global_batch, dedup):
        est = estimate_baseline(scheme, costs, lay, global_batch, policy)
        if est.memory.fits and (best is None or est.step_time < best.step_time):
            best = est
    return best

"""Inputs for the simulator from the runtime's own definitions.

- ``schedule_program_per_rank``: the AF-Pipe schedule that the runtime executes
  (``distributed.schedule.build_af_pipe_schedule``: per pipeline rank, compute actions and
  the library's SEND/RECV actions) turned into per-physical-rank lists of
  ``(op, layer, microbatch)``, with the runtime's meaning of each action
  (``distributed/af_engine.py``): SEND_F of A(l) posts dispatch(l) (+ residual(l) when
  p > 1), SEND_F of F(l) posts combine(l), RECV_F posts the matching receives, SEND_B /
  RECV_B the gradients. Empty F stages of dense layers are dropped.
- ``af_dependencies``: data dependencies of the stage chain (forward A(l) -> dispatch(l)
  -> F(l) -> combine(l) -> A(l+1), residual A(l) -> A(l+1) when p > 1; backward reversed).
- ``cost_duration_fn``: per-op durations from the cost model.

    python -m torchtitan_disagmoe.planner --model qwen3_moe --flavor debug \\
        --cluster this-machine --seq-len 128 --simulate timeline.png
"""

from collections.abc import Callable

from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims
from torchtitan_disagmoe.distributed.pipelining_ir import (
    BACKWARD,
    FORWARD,
    RECV_F,
    SEND_B,
    SEND_F,
)
from torchtitan_disagmoe.distributed.schedule import AFPipeShape, build_af_pipe_schedule

from .af_pipe import AFLayout, _expert_load, links
from .cost import ModelCosts
from .simulate import DepsFn, Op, is_transfer


def af_dependencies(num_layers: int, moe_layers: list[bool], pipeline_depth: int) -> DepsFn:
    """Dependencies of one micro-batch's ops (layer ``num_layers`` is the head)."""
    L, p = num_layers, pipeline_depth

    def deps(op: Op) -> list[Op]:
        name, l, m = op
        if name == "attention_forward":
            if l == 0:
                return []
            d = [("combine", l - 1, m)] if moe_layers[l - 1] else []
            return d + [("residual", l - 1, m) if p > 1 else ("attention_forward", l - 1, m)]
        if name == "attention_backward":
            if l == L:
                return [("attention_forward", L, m)]
            d = [("residual_grad", l, m) if p > 1 else ("attention_backward", l + 1, m)]
            return d + ([("dispatch_grad", l, m)] if moe_layers[l] else [])
        chain = {
            "dispatch": ("attention_forward", l), "expert_forward": ("dispatch", l),
            "combine": ("expert_forward", l), "residual": ("attention_forward", l),
            "combine_grad": ("attention_backward", l + 1), "expert_backward": ("combine_grad", l),
            "dispatch_grad": ("expert_backward", l), "residual_grad": ("attention_backward", l + 1),
        }
        if name not in chain:
            raise ValueError(f"unknown op {name!r}")
        return [(chain[name][0], chain[name][1], m)]

    return deps


def _action_ops(action, moe_layers: list[bool], p: int) -> list[Op]:
    """The ops one schedule action stands for (see the module docstring)."""
    t, s, m = action.computation_type, action.stage_index, action.microbatch_index
    layer, on_expert = s // 2, bool(s % 2)
    if t in (FORWARD, BACKWARD):
        if on_expert and not moe_layers[layer]:
            return []
        kind = "expert" if on_expert else "attention"
        return [(f"{kind}_{'forward' if t == FORWARD else 'backward'}", layer, m)]
    residual = p > 1
    if t in (SEND_F, RECV_F):
        if on_expert:
            return [("combine" if t == SEND_F else "dispatch", layer, m)] if moe_layers[layer] else []
        src = layer if t == SEND_F else layer - 1  # SEND_F of A(l) starts layer l's edges
        if src < 0 or src >= len(moe_layers):
            return []
        ops = [("dispatch" if t == SEND_F else "combine", src, m)] if moe_layers[src] else []
        return ops + ([("residual", src, m)] if residual else [])
    if on_expert:  # SEND_B of F(l): dispatch grads; RECV_B of F(l): combine grads
        return [("dispatch_grad" if t == SEND_B else "combine_grad", layer, m)] if moe_layers[layer] else []
    dst = layer - 1 if t == SEND_B else layer  # SEND_B of A(l) ends layer l-1's edges
    if dst < 0 or dst >= len(moe_layers):
        return []
    ops = [("combine_grad" if t == SEND_B else "dispatch_grad", dst, m)] if moe_layers[dst] else []
    return ops + ([("residual_grad", dst, m)] if residual else [])


def schedule_program_per_rank(dims: DisaggDims, moe_layers: list[bool], microbatches: int,
                              max_inflight: int = 0) -> dict[int, list[Op]]:
    """Per-physical-rank op lists of the AF-Pipe schedule the runtime executes."""
    shape = AFPipeShape(dims.num_layers, dims.pipeline_depth, microbatches, max_inflight)
    lowered = build_af_pipe_schedule(shape)
    out: dict[int, list[Op]] = {}
    for g in range(dims.pipeline_depth):
        for pp_rank, ranks in ((2 * g, dims.attention_group_ranks(g)), (2 * g + 1, dims.expert_group_ranks(g))):
            ops = [op for a in lowered[pp_rank] for op in _action_ops(a, moe_layers, dims.pipeline_depth)]
            for r in ranks:
                out[r] = list(ops)
    return out


def cost_duration_fn(costs: ModelCosts, lay: AFLayout, tokens: float,
                     is_attention: Callable[[int], bool]) -> Callable[[Op, int], float]:
    """Durations of the runtime's ops for layout ``lay`` with ``tokens`` tokens per
    attention rank and micro-batch; a transfer takes the bytes this rank sends or receives
    over its link (the layout's NIC share and intra-node fraction, as in ``af_pipe``).
    ``is_attention(rank)`` tells the simulated ranks' pool (they may stand for groups)."""
    rows_a = tokens * costs.distinct_ranks(lay.ep)  # rows an attention rank sends per layer
    rows_f, copies = _expert_load(costs, lay, tokens)
    row_bytes = {"dispatch": costs.dispatch_row, "combine": costs.combine_row,
                 "dispatch_grad": costs.dispatch_grad_row, "combine_grad": costs.combine_grad_row}
    ln = links(costs, lay)

    def duration(op: Op, rank: int) -> float:
        name, layer, _ = op
        attention = is_attention(rank)
        if is_transfer(name):
            if name.startswith("residual"):
                nbytes, remote = tokens * costs.residual_row, ln.residual_remote
            else:
                nbytes, remote = (rows_a if attention else rows_f) * row_bytes[name], ln.remote
            bw = ln.a_bw if attention else ln.f_bw
            return costs.link_time(nbytes * (1 - remote), nbytes * remote, 0, inter_bw=bw)
        if name.startswith("attention"):
            if layer == costs.args.n_layers:
                fwd, bwd = costs.head_stage(tokens, lay.recompute)
            else:
                fwd, bwd = costs.attention_stage(costs.layers[layer], tokens, lay.recompute)
        else:
            fwd, bwd = costs.expert_stage(copies, costs.num_experts // lay.ep, lay.recompute)
        return fwd if name.endswith("forward") else bwd

    return duration


def af_sender_fn(is_attention: Callable[[int], bool], group_of: Callable[[int], int],
                 pipeline_depth: int) -> Callable[[Op, int], bool]:
    """Which participant of a transfer sends: dispatch and combine-grad leave the attention
    side, combine and dispatch-grad the expert side, the residual (grad) goes from the
    group of layer l (l + 1)."""
    def is_sender(op: Op, rank: int) -> bool:
        name, layer, _ = op
        if name in ("dispatch", "combine_grad"):
            return is_attention(rank)
        if name in ("combine", "dispatch_grad"):
            return not is_attention(rank)
        owner = layer % pipeline_depth if name == "residual" else (layer + 1) % pipeline_depth
        return group_of(rank) == owner

    return is_sender


def hoist_receives(programs: dict[int, list[Op]], is_sender: Callable[[Op, int], bool],
                   actions: int = 1) -> dict[int, list[Op]]:
    """What-if: post every receive ``actions`` compute ops earlier than the schedule does.

    The lowered schedule posts a receive right before the compute that consumes it, so a
    transfer into a rank cannot overlap that rank's previous compute when the transport
    needs the receive posted (NCCL's rendezvous); posting it one compute action earlier
    lets it. Raises nothing itself; the simulator reports a deadlock if one appears."""
    out = {}
    for rank, ops in programs.items():
        moved: list[Op] = []
        for op in ops:
            if is_transfer(op[0]) and not is_sender(op, rank):
                j, seen = len(moved), 0
                while j > 0 and seen < actions:
                    j -= 1
                    seen += not is_transfer(moved[j][0])
                moved.insert(j, op)
            else:
                moved.append(op)
        out[rank] = moved
    return out


def af_latency_fn(costs: ModelCosts, lay: AFLayout) -> Callable[[Op], float]:
    """Latency of each transfer: dispatch and combine send row counts first (2 messages),
    gradients and the residual have known sizes (1 message)."""
    c = costs.cluster
    remote = links(costs, lay).remote
    latency = c.intra_latency if c.nodes == 1 or remote == 0 else c.inter_latency
    return lambda op: latency * (2 if op[0] in ("dispatch", "combine") else 1)


def layout_of(dims: DisaggDims, microbatches: int, max_inflight: int = 0) -> AFLayout:
    """The planner's layout for a runtime layout (own NIC, no expert replication)."""
    return AFLayout(dims.attention_ranks, dims.expert_ranks, dims.pipeline_depth, microbatches,
                    max_inflight or microbatches)

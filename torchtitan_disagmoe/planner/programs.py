"""Inputs for the simulator from the runtime's own definitions.

- ``af_dependencies``: the data dependencies of the disaggregated stage chain
  (forward A(l) -> dispatch(l) -> F(l) -> combine(l) -> A(l+1), the residual hand-off
  A(l) -> A(l+1) when p > 1; backward reversed), for any per-rank lists of
  ``(op, layer, microbatch)`` such as the AF-Pipe schedule's.
- ``participants``: which ranks take part in each op of ``af_engine.global_program``.
- ``engine_program_per_rank``: what today's engine runs: the global program of each
  micro-batch, one micro-batch after another (gradient accumulation, no overlap between
  micro-batches). Not an AF-Pipe schedule; that one comes from ``distributed/schedule.py``.
- ``cost_duration_fn``: per-op durations from the cost model.
"""

from typing import Callable

from torchtitan_disagmoe.distributed.af_engine import global_program
from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims

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


def participants(dims: DisaggDims, name: str, layer: int) -> list[int]:
    """Ranks that run ``(name, layer)`` in the disaggregated engine."""
    g, nxt = dims.group_of_layer(layer), dims.group_of_layer(layer + 1)
    attn, expert = dims.attention_group_ranks, dims.expert_group_ranks
    table = {
        "attention_forward": attn(g), "attention_backward": attn(g),
        "expert_forward": expert(g), "expert_backward": expert(g),
        "dispatch": attn(g) + expert(g), "dispatch_grad": attn(g) + expert(g),
        "combine": expert(g) + attn(nxt), "combine_grad": expert(g) + attn(nxt),
        "residual": attn(g) + attn(nxt), "residual_grad": attn(g) + attn(nxt),
    }
    return table[name]


def engine_program_per_rank(dims: DisaggDims, moe_layers: list[bool], microbatches: int) -> dict[int, list[Op]]:
    """Per-rank lists of today's engine: each micro-batch's global program in turn."""
    program = global_program(dims.num_layers, moe_layers, dims.pipeline_depth)
    out: dict[int, list[Op]] = {r: [] for r in range(dims.attention_ranks + dims.expert_ranks)}
    for m in range(microbatches):
        for name, layer in program:
            for r in participants(dims, name, layer):
                out[r].append((name, layer, m))
    return out


def cost_duration_fn(costs: ModelCosts, dims: DisaggDims, tokens: float,
                     recompute: bool = False) -> Callable[[Op, int], float]:
    """Durations of the engine's ops for ``tokens`` tokens per attention rank and
    micro-batch; transfers by the bytes this rank sends or receives."""
    ep, dp = dims.ep, dims.dp
    rows_a = tokens * costs.distinct_ranks(ep)  # rows an attention rank sends per layer
    rows_f = dp * rows_a / ep  # rows an expert rank receives per layer
    copies = dp * tokens * costs.top_k * costs.routing.imbalance(ep) / ep
    row_bytes = {"dispatch": costs.dispatch_row, "combine": costs.combine_row,
                 "dispatch_grad": costs.dispatch_grad_row, "combine_grad": costs.combine_grad_row}
    single_node = costs.cluster.nodes == 1

    def duration(op: Op, rank: int) -> float:
        name, layer, _ = op
        is_attention = rank < dims.attention_ranks
        if is_transfer(name):
            if name.startswith("residual"):
                nbytes = tokens * costs.residual_row
            else:
                nbytes = (rows_a if is_attention else rows_f) * row_bytes[name]
            return costs.link_time(nbytes if single_node else 0.0, 0.0 if single_node else nbytes, messages=1)
        if name.startswith("attention"):
            if layer == dims.num_layers:
                fwd, bwd = costs.head_stage(tokens, recompute)
            else:
                fwd, bwd = costs.attention_stage(costs.layers[layer], tokens, recompute)
        else:
            fwd, bwd = costs.expert_stage(copies, costs.num_experts // ep, recompute)
        return fwd if name.endswith("forward") else bwd

    return duration

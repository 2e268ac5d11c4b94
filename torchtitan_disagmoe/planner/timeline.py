"""Simulated timeline of a layout: one rank per group replays the AF-Pipe schedule.

Ranks inside a group do the same work at the same time, so the simulation keeps one
attention and one expert rank per group (2p ranks) and gives them the durations of the
real layout (its dp, ep, NIC share). At most ``max_microbatches`` micro-batches are
simulated so that the picture stays readable and fast; the title says how many.
"""

from dataclasses import replace

from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims

from .af_pipe import AFLayout, estimate_af_pipe
from .cost import ModelCosts
from .estimate import local_batch
from .programs import (
    af_dependencies,
    af_latency_fn,
    af_sender_fn,
    cost_duration_fn,
    hoist_receives,
    schedule_program_per_rank,
)
from .search import Plan
from .simulate import SimResult, draw_timeline, simulate


def simulate_layout(costs: ModelCosts, lay: AFLayout, global_batch: int, max_microbatches: int = 8,
                    early_receives: bool = False) -> tuple[SimResult, dict[int, str], int]:
    """(result, rank labels, micro-batches simulated) for one representative rank per group;
    ``early_receives`` posts receives one compute action earlier (``hoist_receives``)."""
    p, num_layers = lay.pipeline_depth, costs.args.n_layers
    moe = [lc.moe for lc in costs.layers]
    m = min(lay.microbatches, max_microbatches)
    rep = DisaggDims(p, p, p, num_layers, costs.num_experts)
    programs = schedule_program_per_rank(rep, moe, m, min(lay.max_in_flight, m))
    tokens = local_batch(global_batch, lay.dp) // lay.microbatches * costs.seq_len
    durations = cost_duration_fn(costs, lay, tokens, lambda r: r < p)
    sender = af_sender_fn(lambda r: r < p, lambda r: r % p, p)
    if early_receives:
        programs = hoist_receives(programs, sender)
    result = simulate(programs, durations, af_dependencies(num_layers, moe, p), is_sender=sender,
                      latency_fn=af_latency_fn(costs, lay))
    labels = {g: f"A{g} ({lay.dp} GPUs)" for g in range(p)}
    labels.update({p + g: f"F{g} ({lay.expert_gpus // p} GPUs)" for g in range(p)})
    return result, labels, m


def draw_recommended_timeline(plan: Plan, path: str, max_microbatches: int = 8) -> str:
    """Draw the simulated schedule of the recommended layout; returns a one-line summary
    comparing it with the same schedule with earlier receives and the analytic estimate."""
    rec = plan.recommended
    if rec is None:
        raise ValueError(f"nothing to simulate: {plan.af.why_none()}")
    lay = AFLayout(**{k: rec.layout[k] for k in AFLayout.__dataclass_fields__})
    result, labels, m = simulate_layout(plan.costs, lay, plan.global_batch, max_microbatches)
    early, _, _ = simulate_layout(plan.costs, lay, plan.global_batch, max_microbatches, early_receives=True)
    title = (f"{plan.model}: simulated AF-Pipe, {m} of {lay.microbatches} micro-batches, "
             f"{result.makespan:.4g} s")
    draw_timeline(result, path, labels, title)
    analytic = estimate_af_pipe(plan.costs, replace(lay, microbatches=m, max_in_flight=min(lay.max_in_flight, m)),
                                plan.global_batch * m // lay.microbatches or 1)
    pipeline = analytic.step_time - analytic.breakdown["grad_sync_exposed_s"] - analytic.breakdown["optimizer_s"]
    return (f"timeline ({m} micro-batches): simulated {result.makespan:.4g} s with the schedule as lowered, "
            f"{early.makespan:.4g} s with receives posted one compute action earlier; analytic {pipeline:.4g} s")

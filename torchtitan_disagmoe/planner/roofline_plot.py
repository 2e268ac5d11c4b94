"""The computation-communication roofline of a plan, as a PNG.

For each pool, x = communication intensity (training FLOPs per byte that crosses its
network link, per rank and micro-batch) and y = FLOP/s per GPU. The pool's roof is

    attainable(x) = min(peak x gemm efficiency, x x link bandwidth x network efficiency)

(the link is the pool's share of the NICs for the chosen NIC division). Its point sits at
its intensity and its achieved rate (FLOPs over the pool's overlapped time per
micro-batch). A pool left of its ridge is network-bound: giving it more GPUs or more of
the NIC bandwidth helps; right of it, compute-bound. Grey dots are the other layouts the
search kept in phase 2. Colocated EP baselines are marked with their all-to-all intensity
on the per-GPU NIC roof.
"""

from .af_pipe import AFLayout, pool_loads
from .search import Plan

_POOL_COLOURS = {"attention": "#4C72B0", "expert": "#DD8452"}


def _layout(est) -> AFLayout:
    return AFLayout(**{k: est.layout[k] for k in AFLayout.__dataclass_fields__})


def draw_roofline(plan: Plan, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rec = plan.recommended
    if rec is None:
        raise ValueError(f"nothing to plot: {plan.af.why_none()}")
    costs = plan.costs
    c, eff = costs.cluster, costs.eff
    roof = c.peak_flops * eff.gemm
    loads = pool_loads(costs, _layout(rec), plan.global_batch)
    points = [load.flops / max(load.net_bytes, 1.0) for load in loads.values()]
    ridge = roof / (min(load.bandwidth for load in loads.values()) * eff.network)
    xs = np.logspace(np.log10(min(points + [ridge]) / 100), np.log10(max(points + [ridge]) * 30), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for pool, load in loads.items():
        colour = _POOL_COLOURS[pool]
        bw = load.bandwidth * eff.network
        ax.plot(xs, np.minimum(roof, xs * bw), color=colour,
                label=f"{pool} pool roof ({load.link} {bw / 1e9:.0f} GB/s)")
        x = load.flops / max(load.net_bytes, 1.0)
        ax.scatter([x], [load.flops / load.time], s=90, color=colour, edgecolor="black", zorder=5,
                   label=f"{pool} pool (chosen)")
    for est in plan.af.near_best:
        if est is rec:
            continue
        for pool, load in pool_loads(costs, _layout(est), plan.global_batch).items():
            ax.scatter([load.flops / max(load.net_bytes, 1.0)], [load.flops / load.time], s=12,
                       color=_POOL_COLOURS[pool], alpha=0.3, zorder=3)
    nic = c.inter_bw * eff.network
    ax.plot(xs, np.minimum(roof, xs * nic), color="grey", linestyle="--",
            label=f"per-GPU NIC roof ({nic / 1e9:.0f} GB/s)")
    for name, est in plan.baselines.items():
        if est is None:
            continue
        flops = costs.model_flops_per_token() * est.tokens_per_step / est.num_gpus
        _, inter = costs.ep_a2a_bytes_per_token(est.layout["expert_parallel"], est.layout["dedup"])
        a2a = inter * est.tokens_per_step / est.num_gpus * sum(lc.moe for lc in costs.layers)
        if a2a > 0:
            ax.scatter([flops / a2a], [flops / est.step_time], marker="^", s=60, label=name, zorder=4)
    ax.axhline(roof, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("communication intensity (FLOP per network byte)")
    ax.set_ylabel("FLOP/s per GPU")
    lay = rec.layout
    nic = "own NIC" if lay["placement"] == "own-nic" else f"NIC share {lay['nic_share']:.2f}"
    ax.set_title(f"{plan.model} S={plan.seq_len} on {c.nodes}x{c.gpus_per_node} {c.name}: A={lay['attention_gpus']} "
                 f"F={lay['expert_gpus']} p={lay['pipeline_depth']} edp={lay['expert_replicas']} {nic}", fontsize=9)
    ax.set_ylim(roof / 1e3, roof * 3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Plan output: the DESIGN.md section 8 JSON object and the human-readable table."""

from .baselines import BASELINES
from .clusters import GB, TFLOPS, GiB
from .estimate import Estimate
from .search import Plan

CONTRACT_FIELDS = ("attention_gpus", "expert_gpus", "pipeline_depth", "microbatches", "step_time_s",
                   "tokens_per_second_per_gpu", "mfu")


def to_json(plan: Plan, details: bool = False) -> dict:
    """``recommended``, ``baselines``, ``speedup`` (exactly those keys unless ``details``)."""
    rec = plan.recommended
    out = {
        "recommended": rec.contract() if rec else None,
        "baselines": {name: (est.contract() if est else None) for name, est in plan.baselines.items()},
        "speedup": plan.speedup(),
    }
    if details:
        out["details"] = _details(plan)
    return out


def _estimate_details(est: Estimate | None) -> dict | None:
    if est is None:
        return None
    return {"layout": est.layout, "breakdown": est.breakdown, "memory_gib": est.memory.bytes_needed / GiB,
            "memory_available_gib": est.memory.bytes_available / GiB, "memory_rank": est.memory.what,
            "tokens_per_step": est.tokens_per_step}


def _details(plan: Plan) -> dict:
    c = plan.costs.cluster
    return {
        "model": plan.model, "seq_len": plan.seq_len, "global_batch_requested": plan.global_batch,
        "cluster": {k: getattr(c, k) for k in c.__dataclass_fields__},
        "efficiency": {k: getattr(plan.costs.eff, k) for k in plan.costs.eff.__dataclass_fields__},
        "recommended": _estimate_details(plan.recommended),
        "baselines": {n: _estimate_details(e) for n, e in plan.baselines.items()},
        "search": {"evaluated": plan.af.evaluated, "feasible": plan.af.feasible, "seconds": plan.af.elapsed_s,
                   "no_layout_reason": None if plan.recommended else plan.af.why_none()},
    }


def _row(name: str, est: Estimate | None, layout: str, speedup: float | None) -> str:
    if est is None:
        return f"{name:<22} {'does not fit / no valid layout':<44}"
    sp = f"{speedup:7.2f}x" if speedup else "       -"
    return (f"{name:<22} {layout:<44} {est.step_time:9.3f} {est.tokens_per_second_per_gpu:10.0f} "
            f"{100 * est.mfu:6.1f}% {est.memory.bytes_needed / GiB:7.1f} {sp}")


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} "


def to_table(plan: Plan) -> str:
    costs, c = plan.costs, plan.costs.cluster
    total, active = costs.args.num_params()
    lines = [
        (f"model {plan.model}: {_count(total)} parameters ({_count(active)} active), "
         f"{_count(costs.model_flops_per_token())}FLOP/token at seq_len {plan.seq_len}"),
        (f"cluster {c.nodes} x {c.gpus_per_node} {c.name}: {c.peak_flops / TFLOPS:.4g} TFLOP/s, "
         f"{c.hbm_bytes / GiB:.1f} GiB, NVLink {c.intra_bw / GB:.4g} GB/s, NIC {c.inter_bw / GB:.4g} GB/s per GPU"),
        (f"global batch {plan.global_batch} sequences requested (rounded per layout to a multiple of its "
         "data-parallel degree)"),
        "",
        f"{'layout':<22} {'':<44} {'step s':>9} {'tok/s/GPU':>10} {'MFU':>7} {'mem GiB':>7} {'speedup':>8}",
    ]
    rec = plan.recommended
    if rec:
        lay = rec.layout
        nic = "own NIC" if lay["placement"] == "own-nic" else f"NIC share {lay['nic_share']:.2f}"
        desc = (f"A={lay['attention_gpus']} F={lay['expert_gpus']} p={lay['pipeline_depth']} "
                f"m={lay['microbatches']} k={lay['max_in_flight']} edp={lay['expert_replicas']} {nic}"
                + (" rc" if lay["recompute"] else ""))
    else:
        desc = ""
    lines.append(_row("af_pipe (recommended)", rec, desc, None))
    speedups = plan.speedup()
    for name in BASELINES:
        est = plan.baselines[name]
        desc = ""
        if est:
            lay = est.layout
            desc = (f"PP={lay['pipeline_parallel']} v={lay['virtual_stages']} EP={lay['expert_parallel']} "
                    f"m={lay['microbatches']}" + (" rc" if lay["recompute"] else ""))
        lines.append(_row(name, est, desc, speedups[name]))
    lines.append("")
    if rec:
        b = rec.breakdown
        lines.append(f"af_pipe: attention pool busy {100 * b['busy_attention']:.0f}%, expert pool busy "
                     f"{100 * b['busy_expert']:.0f}%, fill/drain {b['bubble_s']:.3f} s, exposed gradient "
                     f"reduction {b['grad_sync_exposed_s']:.3f} s; memory peak on {rec.memory.what}")
        if rec.layout["expert_replicas"] > 1:
            lines.append(f"note: runs with disagmoe.expert_replicas = {rec.layout['expert_replicas']} (each expert "
                         "group holds that many full copies of its experts; --no-expert-replication: edp = 1)")
    else:
        lines.append(f"af_pipe: {plan.af.why_none()}")
    if plan.seq_len > costs.args.max_seq_len:
        lines.append(f"note: seq_len {plan.seq_len} > the flavor's max_seq_len {costs.args.max_seq_len}; training it "
                     "needs a longer rope cache (the cost model does not depend on it)")
    lines.append("speedup = predicted tokens/s/GPU of af_pipe over the baseline's best layout "
                 "(model predictions, not measurements); rc = full activation recomputation")
    return "\n".join(lines)

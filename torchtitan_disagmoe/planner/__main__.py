"""Plan a disaggregated (AF-Pipe) run and compare it with colocated expert parallelism.

    python -m torchtitan_disagmoe.planner --model qwen3_moe --flavor 235B-A22B \\
        --cluster h800 --nodes 16 --seq-len 4096 [--global-batch 2048] [--json] [--plot roof.png]
    python -m torchtitan_disagmoe.planner --config train_configs/qwen3_235b_a22b.toml --nodes 16
    python -m torchtitan_disagmoe.planner --model qwen3_moe --flavor debug --cluster this-machine \\
        --seq-len 128 --global-batch 8 --timeline timeline.png

Prints a table by default; ``--json`` prints the DESIGN.md section 8 object
(``recommended``, ``baselines``, ``speedup``; ``--details`` adds ``details``).
"""

import argparse
import json
import sys
from dataclasses import replace

from .clusters import CLUSTER_CHOICES, GB, TFLOPS, GiB, build_cluster
from .cost import Efficiency, ModelCosts
from .memory import MemoryPolicy
from .models import load_model_args
from .report import to_json, to_table
from .routing import RoutingModel
from .search import plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchtitan_disagmoe.planner", description=__doc__.split("\n")[0])
    job = p.add_argument_group("model and job")
    job.add_argument("--model", help="registry name (qwen3_moe, deepseek_moe) or planner-only gpt_oss")
    job.add_argument("--flavor")
    job.add_argument("--config", help="TOML job file: takes model, flavor and seq_len from it")
    job.add_argument("--seq-len", type=int)
    job.add_argument("--global-batch", type=int, help="sequences per step (default: 64K tokens per GPU)")
    hw = p.add_argument_group("cluster (preset numbers overridable)")
    hw.add_argument("--cluster", default="h800", choices=CLUSTER_CHOICES)
    hw.add_argument("--nodes", type=int, default=1)
    hw.add_argument("--gpus-per-node", type=int)
    hw.add_argument("--peak-tflops", type=float)
    hw.add_argument("--hbm-gib", type=float)
    hw.add_argument("--hbm-gbs", type=float, help="HBM bandwidth, GB/s")
    hw.add_argument("--intra-bw-gbs", type=float, help="NVLink per GPU per direction, GB/s")
    hw.add_argument("--inter-bw-gbs", type=float, help="NIC per GPU per direction, GB/s")
    hw.add_argument("--latency-us", type=float, help="per-message latency of both links")
    model = p.add_argument_group("cost-model factors")
    for name, field in (("gemm-eff", "gemm"), ("attention-eff", "attention"), ("network-eff", "network"),
                        ("hbm-eff", "hbm"), ("comm-sm-tax", "comm_sm_tax"),
                        ("intra-layer-exposed", "intra_layer_exposed")):
        model.add_argument(f"--{name}", dest=f"eff_{field}", type=float)
    for name in ("weight-bytes", "grad-bytes", "optimizer-bytes"):
        model.add_argument(f"--{name}", type=int, help="memory per parameter")
    model.add_argument("--usable-memory", type=float, help="fraction of HBM the run may use (0.9)")
    model.add_argument("--routing-trace", help="JSON list of per-token expert-id lists (measured routing)")
    model.add_argument("--routing-imbalance", type=float, default=1.0, help="busiest expert rank / mean")
    model.add_argument("--ep-dedup", choices=("copy", "rank"), default="copy",
                       help="baselines' all-to-all: every routed copy (Megatron) or once per (token, rank)")
    model.add_argument("--no-expert-replication", action="store_true",
                       help="only layouts without expert replicas (edp = 1)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true")
    out.add_argument("--details", action="store_true", help="with --json: add a 'details' object")
    out.add_argument("--plot", help="write the roofline plot (PNG)")
    out.add_argument("--timeline", help="write the simulated timeline of the recommended layout (PNG)")
    return p


def _model_from_args(args) -> tuple[str, str, int]:
    name, flavor, seq_len = args.model, args.flavor, args.seq_len
    if args.config:
        from torchtitan_disagmoe.config.manager import load_job_config

        job = load_job_config(["--job.config_file", args.config])
        name, flavor = name or job.model.name, flavor or job.model.flavor
        seq_len = seq_len or job.training.seq_len
    if not (name and flavor and seq_len):
        raise SystemExit("need --model, --flavor and --seq-len (or --config)")
    return name, flavor, seq_len


def build_costs(args) -> tuple[str, ModelCosts, MemoryPolicy]:
    name, flavor, seq_len = _model_from_args(args)
    model_args = load_model_args(name, flavor)
    latency = args.latency_us * 1e-6 if args.latency_us is not None else None

    def scale(value, unit):
        return value * unit if value is not None else None

    cluster = build_cluster(
        args.cluster, args.nodes, gpus_per_node=args.gpus_per_node,
        peak_flops=scale(args.peak_tflops, TFLOPS), hbm_bytes=scale(args.hbm_gib, GiB),
        hbm_bw=scale(args.hbm_gbs, GB), intra_bw=scale(args.intra_bw_gbs, GB), inter_bw=scale(args.inter_bw_gbs, GB),
        intra_latency=latency, inter_latency=latency)
    eff = Efficiency()
    if args.cluster == "this-machine":  # measured rates are already achievable rates
        from .this_machine import attention_efficiency, load_measurements

        eff = Efficiency(gemm=1.0, attention=attention_efficiency(load_measurements()), network=1.0, hbm=1.0,
                         comm_sm_tax=0.0)
    eff = replace(eff, **{k[4:]: v for k, v in vars(args).items() if k.startswith("eff_") and v is not None})
    moe = model_args.moe
    routing = (RoutingModel.from_file(args.routing_trace, moe.num_experts, moe.top_k) if args.routing_trace
               else RoutingModel(moe.num_experts, moe.top_k, imbalance=args.routing_imbalance))
    policy = MemoryPolicy.for_elem(cluster.elem_bytes)
    policy = replace(policy, **{k: v for k, v in (("weight_bytes", args.weight_bytes),
                                                  ("grad_bytes", args.grad_bytes),
                                                  ("optimizer_bytes", args.optimizer_bytes),
                                                  ("usable_fraction", args.usable_memory)) if v is not None})
    return f"{name}/{flavor}", ModelCosts(model_args, seq_len, cluster, eff, routing), policy


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        label, costs, policy = build_costs(args)
        result = plan(costs, args.global_batch, policy, model=label, dedup=args.ep_dedup,
                      replication=not args.no_expert_replication)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(result, args.details), indent=1))
    else:
        print(to_table(result))
    if result.recommended is None:
        print(f"no AF-Pipe layout: {result.af.why_none()}", file=sys.stderr)
        return 1
    if args.plot:
        from .roofline_plot import draw_roofline

        draw_roofline(result, args.plot)
    if args.timeline:
        from .timeline import draw_recommended_timeline

        print(draw_recommended_timeline(result, args.timeline), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

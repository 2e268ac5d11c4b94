"""Side-by-side throughput of training layouts on the same model, data and global batch.

Each layout is a real ``./run_train.sh`` run (torchrun, gloo on CPU) with the same seed,
steps and global batch; warm-up steps are discarded and the rest averaged from each run's
metrics.jsonl. Layouts run one after another in one invocation, so they share the
machine's conditions; run it twice if the machine is busy.

    python scripts/bench_compare.py                          # colocated EP vs AF-Pipe, 2 ranks
    python scripts/bench_compare.py --layouts single,fsdp2,ep,af_pipe_mb1,af_pipe_mb2,af_pipe_mb4
    python scripts/bench_compare.py --json --training.seq_len 256   # overrides go to every run

Layouts: ``single`` (1 process), ``fsdp2`` (FSDP2 over all ranks, experts replicated),
``ep`` (colocated: FSDP2 + experts sharded over all ranks), ``af_pipe`` (half the ranks
attention, half experts, p = 1, ``--microbatches`` micro-batches) and ``af_pipe_mbK``
(the same with K micro-batches). The colocated baselines the planner also predicts:
``ep_overlap`` (``ep`` with the all-to-all overlapped with expert compute inside each
layer, ``--overlap-chunks`` token chunks), and pipeline parallel 2 with EP + FSDP2 over
the other world / 2 ranks: ``ep_1f1b``, ``ep_1f1b_interleaved`` (2 stages per rank) and
``dualpipe`` (DualPipeV), each with ``--pp-microbatches`` micro-batches. ``speedup`` is
af_pipe tokens/s over ep tokens/s when both ran.

``--cluster-in-a-box`` runs every layout inside one emulated cluster of ``--nodes`` nodes
(network namespaces, a rate-limited link per node calibrated to this CPU's FLOP/s and the
target's inter-node bandwidth, ``--network-scale`` times faster), ``--world-size / --nodes``
ranks per node, node i holding ranks i*N ..; see docs/cluster_in_a_box.md:

    python scripts/bench_compare.py --cluster-in-a-box --nodes 2 --world-size 4 --layouts ep,af_pipe
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLOCATED = {"single": lambda world: (1, 1, 1), "fsdp2": lambda world: (world, 1, world),
             "ep": lambda world: (world, world, world)}  # (ranks, ep degree, data-parallel ranks)
PIPELINED = {"ep_1f1b": "1F1B", "ep_1f1b_interleaved": "Interleaved1F1B", "dualpipe": "DualPipeV"}
PP_DEGREE = 2  # pipeline ranks of the PIPELINED layouts; the rest is data/expert parallel
REPORTED = ("busy_fraction_attention", "busy_fraction_expert", "exposed_comm_fraction", "dispatch_bytes",
            "combine_bytes", "residual_bytes")


def layout_settings(name: str, world: int, args) -> tuple[int, int, dict]:
    """(ranks, data-parallel ranks, config overrides) of a layout name."""
    if name in COLOCATED:
        ranks, ep, dp = COLOCATED[name](world)
        return ranks, dp, {"disagmoe.mode": "colocated", "parallelism.expert_parallel_degree": ep}
    if name == "ep_overlap":
        return world, world, {"disagmoe.mode": "colocated", "parallelism.expert_parallel_degree": world,
                              "parallelism.expert_parallel_overlap": "true",
                              "parallelism.expert_parallel_overlap_chunks": args.overlap_chunks}
    if name in PIPELINED:
        if world % PP_DEGREE:
            raise ValueError(f"layout {name} needs an even --world-size")
        dp = world // PP_DEGREE
        local_batch = args.global_batch // dp
        if local_batch % args.pp_microbatches:
            raise ValueError(f"--pp-microbatches {args.pp_microbatches} must divide the local batch {local_batch}")
        return world, dp, {"disagmoe.mode": "colocated", "parallelism.expert_parallel_degree": -1,
                           "parallelism.pipeline_parallel_degree": PP_DEGREE,
                           "parallelism.pipeline_parallel_schedule": PIPELINED[name],
                           "parallelism.pipeline_parallel_microbatch_size": local_batch // args.pp_microbatches}
    if name == "af_pipe" or name.startswith("af_pipe_mb"):
        microbatches = int(name[len("af_pipe_mb"):]) if name != "af_pipe" else args.microbatches
        half = world // 2
        return world, half, {"disagmoe.mode": "af_pipe", "disagmoe.attention_ranks": half,
                             "disagmoe.expert_ranks": world - half, "disagmoe.pipeline_depth": 1,
                             "disagmoe.microbatches": microbatches}
    raise ValueError(name)


def run_layout(name: str, world: int, args, overrides: list[str], folder: Path, cluster=None) -> dict:
    ranks, dp, settings = layout_settings(name, world, args)
    settings = {**settings, "training.local_batch_size": args.global_batch // dp,
                "training.steps": args.steps, "metrics.log_freq": 1, "checkpoint.enable": "false",
                "metrics.enable_tensorboard": "false", "job.dump_folder": str(folder)}
    if cluster is not None:  # --cluster-in-a-box: one torchrun per emulated node
        from torchtitan_disagmoe.tools import cluster_in_a_box as cib

        threads = cib.threads_per_rank(ranks)
        train_args = cib.train_module_args(args.config, [f"--{k}={v}" for k, v in settings.items()] + overrides,
                                           threads)
        commands, envs = cluster.torchrun_commands(ranks, world // args.nodes, train_args, threads)
        sent = cluster.link_bytes()
        nodes = cluster.run(commands, envs, cwd=REPO)
        sent = None if sent is None else cluster.link_bytes() - sent
        if any(r.returncode != 0 for r in nodes):
            sys.exit(f"layout {name} failed:\n" + "\n".join(f"[node {r.node}, exit {r.returncode}]\n{r.output[-2000:]}"
                                                            for r in nodes))
    else:
        cmd = ["./run_train.sh"] + [f"--{k}={v}" for k, v in settings.items()] + overrides
        env = dict(os.environ, NGPU=str(ranks), CONFIG_FILE=args.config)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"layout {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.warmup]
    seconds = sum(r["elapsed_s"] for r in timed)
    tokens = sum(r["tokens_per_second"] * r["elapsed_s"] for r in timed)
    result = {
        "layout": name, "ranks": ranks, "tokens_per_second": tokens / seconds,
        "mfu": sum(r["mfu"] for r in timed) / len(timed),
        "step_time_s": seconds / len(timed), "memory_gib": max(r["memory_gib"] for r in records),
        "final_loss": records[-1]["loss"],
    }
    for key in REPORTED:
        if key in timed[0]:
            result[key] = sum(r[key] for r in timed) / len(timed)
    if cluster is not None and sent is not None:
        result["internode_bytes_per_step"] = sent / args.steps  # whole run (start-up included) / steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="ep,af_pipe")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches of the af_pipe layout")
    parser.add_argument("--pp-microbatches", type=int, default=4,
                        help="micro-batches of the pipelined layouts (ep_1f1b, ep_1f1b_interleaved, dualpipe)")
    parser.add_argument("--overlap-chunks", type=int, default=2, help="token chunks of the ep_overlap layout")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5, help="steps discarded before timing")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--config", default="train_configs/debug_model.toml")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cluster-in-a-box", action="store_true",
                        help="run every layout on an emulated multi-node cluster with a slow network (root)")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (--cluster-in-a-box)")
    parser.add_argument("--network-scale", type=float, default=1.0,
                        help="link rate x this (--cluster-in-a-box): 4 = 4x faster network, 0.25 = 4x slower")
    parser.add_argument("--target", default="h800", help="cluster whose FLOP/s : network ratio is emulated")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="netem delay per link direction")
    args, overrides = parser.parse_known_args()
    names = args.layouts.split(",")
    for name in names:
        try:
            layout_settings(name, args.world_size, args)
        except ValueError as exc:
            if str(exc) != name:
                parser.error(str(exc))
            parser.error(f"--layouts: unknown layout {name!r}; allowed: {list(COLOCATED)} + ep_overlap, "
                         f"{list(PIPELINED)}, af_pipe, af_pipe_mbK")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    cluster_info = None
    if args.cluster_in_a_box:
        if args.nodes < 1 or args.world_size % args.nodes:
            parser.error(f"--world-size {args.world_size} must be a multiple of --nodes {args.nodes}")
        sys.path.insert(0, str(REPO))
        from torchtitan_disagmoe.tools import cluster_in_a_box as cib

        try:
            cal = cib.calibrate(args.nodes, args.world_size // args.nodes, args.network_scale, args.target,
                                args.delay_ms)
        except ValueError as exc:
            parser.error(str(exc))
        log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else print
        log(cal.describe())
        cluster = cib.open_cluster(args.nodes, cal.rate_bit_per_node, args.delay_ms, log=log)
        with tempfile.TemporaryDirectory() as tmp, cluster:
            cluster_info = {**cal.as_dict(), "emulated": cluster.emulate}
            log(f"every layout runs on {args.nodes} {'emulated' if cluster.emulate else 'loopback (NOT emulated)'} "
                f"nodes x {args.world_size // args.nodes} ranks, node i = ranks i*N ..")
            results = [run_layout(n, args.world_size, args, overrides, Path(tmp) / n, cluster) for n in names]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run_layout(n, args.world_size, args, overrides, Path(tmp) / n) for n in names]
    base = results[0]["tokens_per_second"]
    ratios = {r["layout"]: r["tokens_per_second"] / base for r in results}
    by_name = {r["layout"]: r for r in results}
    speedup = (by_name["af_pipe"]["tokens_per_second"] / by_name["ep"]["tokens_per_second"]
               if {"af_pipe", "ep"} <= by_name.keys() else None)
    if args.json:
        out = {"results": results, "ratio_vs_" + names[0]: ratios, "speedup": speedup}
        if cluster_info is not None:
            out["cluster_in_a_box"] = cluster_info
        print(json.dumps(out, indent=2))
        return
    print(f"{'layout':20} {'ranks':>5} {'tokens/s':>9} {'step s':>7} {'MFU':>7} {'mem GiB':>7} {'loss':>7} "
          f"{'busy A':>6} {'busy F':>6} {'exposed':>7} {'MB moved':>8} {'x ' + names[0]:>9}")
    for r in results:
        moved = sum(r.get(k, 0.0) for k in ("dispatch_bytes", "combine_bytes", "residual_bytes")) / 1e6
        busy = [f"{r[k]:6.2f}" if k in r else f"{'-':>6}" for k in REPORTED[:3]]
        print(f"{r['layout']:20} {r['ranks']:5d} {r['tokens_per_second']:9.0f} {r['step_time_s']:7.3f} "
              f"{100 * r['mfu']:6.2f}% {r['memory_gib']:7.2f} {r['final_loss']:7.4f} {busy[0]} {busy[1]} "
              f"{busy[2]:>7} {moved:8.2f} {ratios[r['layout']]:9.2f}")
    if speedup is not None:
        print(f"speedup (af_pipe tokens/s over ep tokens/s): {speedup:.2f}")
    if any("internode_bytes_per_step" in r for r in results):
        print("inter-node MB per step, counted on the emulated links (run total / steps): " + ", ".join(
            f"{r['layout']} {r['internode_bytes_per_step'] / 1e6:.2f}" for r in results))


if __name__ == "__main__":
    main()

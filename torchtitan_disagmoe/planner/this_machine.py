"""The ``this-machine`` cluster: micro-benchmarks of this CPU, cached.

A "GPU" here is one training process (rank) on this host; ``gpus_per_node`` defaults to
the number of cores, one thread per rank. Measured (about 10 s in total):

- fp32 GEMM FLOP/s of one thread (1024^3 matmuls), times the cores = the machine's peak;
  each rank gets cores / ranks of it.
- causal attention (SDPA forward + backward) FLOP/s of one thread; its ratio to the GEMM
  rate becomes ``Efficiency.attention`` for this machine.
- memory bandwidth (a large tensor copy) shared by the ranks.
- gloo point-to-point bandwidth and latency between 2 local processes: both the
  "intra-node" and the "inter-node" link (override ``--inter-bw-gbs`` to model a ``tc``
  rate limit between emulated nodes, DESIGN.md section 6).

The result is cached in ``~/.cache/torchtitan_disagmoe/this_machine.json`` (the directory
can be moved with ``TORCHTITAN_DISAGMOE_CACHE_DIR``); delete it, or run this module, to
measure again.

    python -m torchtitan_disagmoe.planner.this_machine      # measure and print
"""

import json
import os
import time
from pathlib import Path

import torch

from .clusters import Cluster


def cache_file() -> Path:
    """``$TORCHTITAN_DISAGMOE_CACHE_DIR/this_machine.json`` (default ~/.cache/torchtitan_disagmoe)."""
    root = os.environ.get("TORCHTITAN_DISAGMOE_CACHE_DIR", str(Path.home() / ".cache" / "torchtitan_disagmoe"))
    return Path(root) / "this_machine.json"

MEASURE_KEYS = ("cores", "gemm_flops_per_core", "attention_flops_per_core", "mem_bw", "mem_bytes",
                "p2p_bw", "p2p_latency")


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gemm_flops() -> float:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_time(lambda: a @ b, 5)


def _attention_flops() -> float:
    """Causal SDPA forward + backward; FLOPs counted as the model does (causal half)."""
    heads, seq, hd = 4, 1024, 64
    q, k, v = (torch.randn(1, heads, seq, hd, requires_grad=True) for _ in range(3))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    flops = 3 * 2 * heads * (hd + hd) * seq * (seq + 1) / 2
    return flops / _best_time(step, 3)


def _mem_bw() -> float:
    x = torch.empty(64 * 2**20, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _best_time(lambda: y.copy_(x), 5)  # read + write


def _p2p_worker(rank: int, port: int, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for label, numel in (("small", 1), ("large", 8 * 2**20)):
        t = torch.zeros(numel)
        reps = 30 if label == "small" else 7
        dist.barrier()
        times = []
        for _ in range(reps):  # ping-pong: one message each way per repetition, posted
            # as the runtime posts (async batch, then wait): blocking send/recv take ~1.3 ms
            # per message on this host, the async path ~0.06 ms (docs/planner.md section 8)
            start = time.perf_counter()
            for op in ((dist.isend, dist.irecv) if rank == 0 else (dist.irecv, dist.isend)):
                for work in dist.batch_isend_irecv([dist.P2POp(op, t, 1 - rank)]):
                    work.wait()
            times.append((time.perf_counter() - start) / 2)
        results[label] = sorted(times)[len(times) // 2]  # median: the first ones set up the pair
    if rank == 0:
        latency = results["small"]
        bw = 8 * 2**20 * 4 / max(results["large"] - latency, 1e-9)
        Path(out_file).write_text(json.dumps({"p2p_bw": bw, "p2p_latency": latency}))
    dist.destroy_process_group()


def _p2p_bandwidth() -> tuple[float, float]:
    from .host_bench import spawn_for_json

    data = spawn_for_json(_p2p_worker, 2)
    return data["p2p_bw"], data["p2p_latency"]


def measure() -> dict:
    """Run the micro-benchmarks (about 10 s on a 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gemm, attention = _gemm_flops(), _attention_flops()
    finally:
        torch.set_num_threads(threads)
    mem_bw = _mem_bw()
    p2p_bw, p2p_latency = _p2p_bandwidth()
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"cores": os.cpu_count() or 1, "gemm_flops_per_core": gemm, "attention_flops_per_core": attention,
            "mem_bw": mem_bw, "mem_bytes": float(pages), "p2p_bw": p2p_bw, "p2p_latency": p2p_latency}


def load_measurements(path: Path | None = None, refresh: bool = False, measure_fn=measure) -> dict:
    """Cached micro-benchmark results; measured (and cached) when absent or ``refresh``."""
    path = path or cache_file()
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        if all(k in data for k in MEASURE_KEYS):
            return data
    data = measure_fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def cluster_from_measurements(data: dict, ranks: int | None = None) -> Cluster:
    """A one-node cluster of ``ranks`` processes (default: one per core), fp32."""
    ranks = ranks or int(data["cores"])
    share = min(1.0, data["cores"] / ranks)  # cores per rank, at most one thread each
    return Cluster(
        name="this-machine", nodes=1, gpus_per_node=ranks,
        peak_flops=data["gemm_flops_per_core"] * share,
        hbm_bytes=data["mem_bytes"] / ranks, hbm_bw=data["mem_bw"] / ranks,
        intra_bw=data["p2p_bw"], inter_bw=data["p2p_bw"],
        intra_latency=data["p2p_latency"], inter_latency=data["p2p_latency"], elem_bytes=4)


def attention_efficiency(data: dict) -> float:
    """Causal attention rate as a fraction of the GEMM rate on this machine."""
    return min(1.0, data["attention_flops_per_core"] / data["gemm_flops_per_core"])


def this_machine_cluster(path: Path | None = None) -> Cluster:
    return cluster_from_measurements(load_measurements(path))


if __name__ == "__main__":
    print(json.dumps(load_measurements(refresh=True), indent=1))

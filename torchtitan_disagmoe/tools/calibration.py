"""Calibration of the emulated cluster: this CPU's FLOP/s per rank, and the per-node
link rate that gives the same FLOP/s-per-byte ratio as a target GPU cluster.

Used by ``cluster_in_a_box`` (and through it by ``scripts/bench_compare.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

# Target clusters: (dense BF16 peak FLOP/s per GPU, inter-node bytes/s per GPU, note).
# H800 SXM5: 989.4 TFLOP/s dense BF16; one 400 Gb/s InfiniBand NIC per GPU = 50 GB/s.
TARGETS: dict[str, tuple[float, float, str]] = {
    "h800": (989.4e12, 50e9, "H800 SXM5, 989.4 TFLOP/s dense BF16, 400 Gb/s NIC (50 GB/s) per GPU"),
}


def _planner_targets() -> None:
    """Add the planner's cluster presets (h100, h200, b200, ...) as targets when importable."""
    try:
        from torchtitan_disagmoe.planner.clusters import PRESETS
    except Exception:  # noqa: BLE001  (the planner is optional here)
        return
    for name, cluster in PRESETS.items():
        if name not in TARGETS:
            TARGETS[name] = (cluster.peak_flops, cluster.inter_bw,
                             (f"{name} preset of the planner, {cluster.peak_flops / 1e12:.1f} TFLOP/s, "
                              f"{cluster.inter_bw / 1e9:.0f} GB/s per GPU across nodes"))


_planner_targets()


_GEMM_WORKER = r"""
import sys, time, torch
threads, size, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(threads)
a, b = torch.randn(size, size), torch.randn(size, size)
for _ in range(3):
    a @ b
print("ready", flush=True)
sys.stdin.readline()
n, start = 0, time.perf_counter()
while True:
    a @ b
    n += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
        break
print(2 * size**3 * n / elapsed, flush=True)
"""


def threads_per_rank(ranks_on_machine: int, cores: int | None = None) -> int:
    """Torch threads per rank when ``ranks_on_machine`` ranks share this machine's cores."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, ranks_on_machine))


def node_cpus(nodes: int) -> list[list[int]] | None:
    """Disjoint CPU sets, one per node (this process's CPUs split evenly, node 0 first), so that
    a node's compute is its own as on a real cluster; None when there are fewer CPUs than
    nodes or ``TTD_PIN_CORES=0`` (then all ranks float over all cores)."""
    if os.environ.get("TTD_PIN_CORES", "1") == "0" or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < nodes:
        return None
    per = len(cpus) // nodes
    return [cpus[i * per:(i + 1) * per] for i in range(nodes)]


def measure_rank_flops(ranks: int, threads: int, size: int = 512, seconds: float = 2.0,
                       cpusets: list[list[int]] | None = None) -> float:
    """fp32 GEMM FLOP/s per rank with ``ranks`` processes of ``threads`` threads computing at once.

    All processes start their timed loop together (after import and warm-up), so the
    result is what each rank gets while every rank of the machine computes: with more ranks
    than cores it includes the sharing of cores. Mean over the processes. ``cpusets[r]``
    pins process r (as its node's ranks are pinned).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = []
    for r in range(ranks):
        argv, extra = _pinned([sys.executable, "-c", _GEMM_WORKER, str(threads), str(size), str(seconds)],
                              cpusets[r] if cpusets else None)
        procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                      **extra))
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("GEMM calibration worker failed to start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        rates = [float(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return sum(rates) / len(rates)


def _pinned(argv: list[str], cpus: list[int] | None) -> tuple[list[str], dict]:
    """``argv`` run on ``cpus`` (inherited by its children): ``taskset`` when installed, else
    an affinity call between fork and exec. Returns (argv, extra Popen arguments)."""
    if not cpus:
        return argv, {}
    if shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, cpus)), *argv], {}
    return argv, {"preexec_fn": lambda: os.sched_setaffinity(0, cpus)}


@dataclass
class Calibration:
    """The chosen emulation: this CPU's FLOP/s per rank and the link rate that matches a target."""

    nodes: int
    ranks_per_node: int
    cores: int
    threads: int
    flops_per_rank: float
    flops_source: str
    target: str
    target_note: str
    target_flops: float
    target_bytes_per_s: float
    network_scale: float
    delay_ms: float
    link_bytes_per_rank: float
    rate_bit_per_node: float
    rate_source: str
    cpus: list[list[int]] | None = None

    @property
    def ratio(self) -> float:
        """Target FLOP per byte of inter-node bandwidth (per GPU), before network_scale."""
        return self.target_flops / self.target_bytes_per_s

    @property
    def emulated_ratio(self) -> float:
        return self.flops_per_rank / self.link_bytes_per_rank

    def describe(self) -> str:
        ranks = self.nodes * self.ranks_per_node
        per_core = ranks / self.cores
        lines = [
            f"cluster-in-a-box: {self.nodes} nodes x {self.ranks_per_node} ranks = {ranks} ranks on "
            f"{self.cores} cores: {self.threads} torch thread{'s' if self.threads > 1 else ''} per rank"
            + (f", {per_core:g} ranks per core (they time-share the cores)" if per_core > 1 else ""),
            "  cores: " + ("; ".join(f"node {i} on CPU {','.join(map(str, c))}" for i, c in enumerate(self.cpus))
                           + " (pinned: a node's compute is its own)" if self.cpus else
                           "all ranks float over all CPUs (not pinned per node)"),
            f"  compute: {self.flops_per_rank / 1e9:.1f} GFLOP/s per rank ({self.flops_source})",
            (f"  target {self.target}: {self.target_flops / 1e12:.1f} TFLOP/s per GPU / "
             f"{self.target_bytes_per_s / 1e9:.0f} GB/s inter-node per GPU = {self.ratio:.0f} FLOP per byte; "
             f"network scale {self.network_scale:g}"),
            (f"  link: {self.link_bytes_per_rank / 1e6:.3f} MB/s per rank -> {self.rate_bit_per_node / 1e6:.2f} "
             f"Mbit/s per node link ({self.ranks_per_node} rank(s)), each direction ({self.rate_source}); "
             f"emulated ratio {self.emulated_ratio:.0f} FLOP/byte"),
            f"  latency: {self.delay_ms:g} ms added per link direction (netem)"
            + (" (none added; veth + bridge alone)" if self.delay_ms == 0 else ""),
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "ranks_per_node": self.ranks_per_node, "cores": self.cores,
                "threads_per_rank": self.threads, "flops_per_rank": self.flops_per_rank,
                "target": self.target, "target_flop_per_byte": self.ratio, "network_scale": self.network_scale,
                "link_bytes_per_rank": self.link_bytes_per_rank, "rate_mbit_per_node": self.rate_bit_per_node / 1e6,
                "delay_ms": self.delay_ms, "emulated_flop_per_byte": self.emulated_ratio, "node_cpus": self.cpus}


def calibrate(nodes: int, ranks_per_node: int, network_scale: float = 1.0, target: str = "h800",
              delay_ms: float = 0.0, flops_per_rank: float | None = None, rate_mbit: float | None = None,
              cores: int | None = None) -> Calibration:
    """Choose the per-node link rate so that FLOP/s per rank / link bytes/s per rank = target ratio.

    ``network_scale`` multiplies the link rate (4.0: 4x faster network, 0.25: 4x slower).
    Each GPU of the target has its own NIC, so a node link carries ``ranks_per_node`` times
    the per-rank rate. ``rate_mbit`` sets the node link rate directly instead.
    """
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: allowed {sorted(TARGETS)}")
    if network_scale <= 0:
        raise ValueError("--network-scale must be > 0")
    cores = cores or os.cpu_count() or 1
    ranks = nodes * ranks_per_node
    threads = threads_per_rank(ranks, cores)
    cpus = node_cpus(nodes)
    if flops_per_rank is None:
        flops_per_rank = measure_rank_flops(ranks, threads,
                                            cpusets=[cpus[r // ranks_per_node] for r in range(ranks)] if cpus else None)
        source = (f"measured: fp32 512x512 GEMM, {ranks} ranks x {threads} thread{'s' if threads > 1 else ''} "
                  "computing at once")
    else:
        source = "given"
    target_flops, target_bw, note = TARGETS[target]
    if rate_mbit is not None:
        rate_bit = rate_mbit * 1e6
        per_rank = rate_bit / 8 / ranks_per_node
        rate_source = "given"
    else:
        per_rank = flops_per_rank / (target_flops / target_bw) * network_scale
        rate_bit = per_rank * 8 * ranks_per_node
        rate_source = "calibrated"
    return Calibration(nodes, ranks_per_node, cores, threads, flops_per_rank, source, target, note, target_flops,
                       target_bw, network_scale, delay_ms, per_rank, rate_bit, rate_source, cpus)



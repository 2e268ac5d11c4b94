"""Cluster descriptions for the planner: presets of 8-GPU nodes, custom overrides, and
``this-machine`` (built from micro-benchmarks, see ``this_machine.py``).

All bandwidths are bytes per second *per direction* (links are full duplex), FLOP/s are
dense (no 2:4 sparsity), and every preset number names its source. Achievable fractions
of these peaks live in ``cost.Efficiency``, not here.

    python -m torchtitan_disagmoe.planner --cluster h800 --nodes 16 --inter-bw-gbs 25 ...
"""

from dataclasses import dataclass, replace

GB = 1e9
GiB = 2**30
MiB = 2**20
TFLOPS = 1e12


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    peak_flops: float
    """Dense peak of one GPU in the training dtype (BF16 on GPUs), FLOP/s."""
    hbm_bytes: float
    """Memory of one GPU (bytes)."""
    hbm_bw: float
    """Memory bandwidth of one GPU (bytes/s)."""
    intra_bw: float
    """GPU-to-GPU bandwidth inside a node, one direction (bytes/s)."""
    inter_bw: float
    """Inter-node (NIC) bandwidth of one GPU, one direction (bytes/s)."""
    intra_latency: float = 5e-6
    inter_latency: float = 10e-6
    elem_bytes: int = 2
    """Bytes per activation/weight element moved and computed (2: BF16, 4: fp32 on CPU)."""

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ValueError(f"cluster {key} = {getattr(self, key)} must be >= 1")
        for key in ("peak_flops", "hbm_bytes", "hbm_bw", "intra_bw", "inter_bw"):
            if getattr(self, key) <= 0:
                raise ValueError(f"cluster {key} = {getattr(self, key)} must be > 0")


# ---- presets: one node of 8 GPUs ---------------------------------------------------------
# Dense BF16: NVIDIA lists Hopper SXM (H100/H800/H200) Tensor Core BF16 as 1,979 TFLOPS
# "with sparsity", i.e. 989.4 TFLOPS dense (H100 and H200 datasheets; the H800 is the same
# GH100 die with NVLink and FP64 cut, the BF16 Tensor Core rate is unchanged).
_HOPPER_BF16 = 989.4 * TFLOPS

# HBM sizes are what nvidia-smi reports (80 GB parts: 81,559 MiB; H200: 143,771 MiB;
# B200: 183,359 MiB), which is the memory a training process can see.
PRESETS: dict[str, Cluster] = {
    # H800 SXM5: 80 GB HBM3 at 3.35 TB/s (as H100 SXM5). NVLink cut to 400 GB/s
    # bidirectional = 200 GB/s per direction (NVIDIA H800 spec). Inter-node: one 400 Gb/s
    # InfiniBand NIC per GPU = 50 GB/s. The DeepSeek-V3 technical report (arXiv 2412.19437,
    # sec. 3.2.2) gives 160 GB/s achievable NVLink and 50 GB/s IB on its H800 nodes; our
    # Efficiency.network (0.8) maps 200 -> 160 GB/s.
    "h800": Cluster("h800", 1, 8, _HOPPER_BF16, 81559 * MiB, 3.35e12, 200 * GB, 50 * GB),
    # H100 SXM5: 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s bidirectional (NVIDIA H100
    # datasheet); DGX H100 has 8x ConnectX-7 400 Gb/s, one per GPU (DGX H100 user guide).
    "h100": Cluster("h100", 1, 8, _HOPPER_BF16, 81559 * MiB, 3.35e12, 450 * GB, 50 * GB),
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional (NVIDIA H200
    # datasheet); DGX H200: 8x ConnectX-7 400 Gb/s.
    "h200": Cluster("h200", 1, 8, _HOPPER_BF16, 143771 * MiB, 4.8e12, 450 * GB, 50 * GB),
    # B200 (HGX, 1,000 W): BF16 dense 2,250 TFLOPS (4,500 with sparsity, NVIDIA HGX B200
    # spec). DGX B200: 1,440 GB HBM3e and 64 TB/s in total = 180 GB and 8 TB/s per GPU;
    # NVLink 5 1.8 TB/s bidirectional per GPU (14.4 TB/s aggregate); 8x ConnectX-7 400 Gb/s.
    "b200": Cluster("b200", 1, 8, 2250 * TFLOPS, 183359 * MiB, 8.0e12, 900 * GB, 50 * GB),
}
# Latencies (5 us NVLink, 10 us network per message) are assumed orders of magnitude for
# NCCL point-to-point messages, not datasheet values; they matter only for tiny messages.

CLUSTER_CHOICES = sorted(PRESETS) + ["this-machine"]


def build_cluster(preset: str, nodes: int = 1, **overrides) -> Cluster:
    """A preset with ``nodes`` nodes and any field overridden (None values are ignored).

    ``this-machine`` runs (or reads the cached result of) the micro-benchmarks.
    """
    if preset == "this-machine":
        from .this_machine import this_machine_cluster

        base = this_machine_cluster()
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"--cluster {preset!r} is not a preset; allowed: {CLUSTER_CHOICES}")
    unknown = set(overrides) - set(Cluster.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown cluster fields {sorted(unknown)}")
    values = {k: v for k, v in overrides.items() if v is not None}
    cluster = replace(base, nodes=nodes, **values)
    cluster.validate()
    return cluster


def describe(cluster: Cluster) -> str:
    return (f"{cluster.nodes} x {cluster.gpus_per_node} {cluster.name}: "
            f"{cluster.peak_flops / TFLOPS:.4g} TFLOP/s, {cluster.hbm_bytes / GiB:.4g} GiB at "
            f"{cluster.hbm_bw / GB:.4g} GB/s, intra {cluster.intra_bw / GB:.4g} GB/s, "
            f"inter {cluster.inter_bw / GB:.4g} GB/s per GPU")

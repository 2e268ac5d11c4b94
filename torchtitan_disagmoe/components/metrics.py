"""Training metrics: torchtitan-style console lines, TensorBoard and ``metrics.jsonl``.

``<dump_folder>/metrics.jsonl`` holds one JSON object per logged step with at least
``step, loss, grad_norm, lr, tokens_per_second, mfu, memory_gib`` (DESIGN.md section 8).
It is opened in append mode: a resumed or failed run never erases what was logged.

Why not torchtitan's MetricsProcessor: its device-memory monitor assumes a CUDA/XPU
device (it fails on CPU hosts) and it has no JSON-lines sink. TensorBoard writing uses
``torch.utils.tensorboard`` like torchtitan.
"""

import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

logger = logging.getLogger("torchtitan_disagmoe")

# Dense BF16 peak FLOP/s per GPU (vendor data sheets), used for MFU when not configured.
_GPU_PEAK_FLOPS = {"H100": 989e12, "H800": 989e12, "H200": 989e12, "A100": 312e12,
                   "B200": 2250e12, "MI300X": 1307e12}


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 512, repeats: int = 8) -> float:
    """Achieved FLOP/s of a large matmul on this rank's threads: the CPU 'peak' for MFU."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    elapsed = time.perf_counter() - start
    return 2 * size**3 * repeats / elapsed


def resolve_peak_flops(configured: float, device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s per rank, where it came from)."""
    if configured > 0:
        return configured, "configured (metrics.peak_flops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"data sheet for {name}"
        return 989e12, f"unknown GPU {name}; assuming H100 bf16 peak"
    return measure_cpu_peak_flops(), "measured fp32 matmul on this CPU"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocator peak on GPU, peak RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", level=level, force=True)


class MetricsLogger:
    """Writes metrics from rank 0; other ranks only time steps (the values are global)."""

    def __init__(self, dump_folder: str, rank: int, enable_tensorboard: bool, log_freq: int):
        self.rank = rank
        self.log_freq = log_freq
        self.jsonl = None
        self.tb = None
        if rank == 0:
            folder = Path(dump_folder)
            folder.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(folder / "metrics.jsonl", "a", buffering=1)
            if enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(folder / "tb"))
        self._last_time = time.perf_counter()
        self._tokens_since_log = 0

    def should_log(self, step: int, last_step: int) -> bool:
        return step % self.log_freq == 0 or step == last_step or step == 1

    def count_tokens(self, num_tokens: int) -> None:
        self._tokens_since_log += num_tokens

    def log(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Add throughput and MFU to ``values``, write them (rank 0) and return them."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        values = {"step": step, **values,
                  "tokens_per_second": self._tokens_since_log / elapsed, "elapsed_s": elapsed}
        self._last_time, self._tokens_since_log = now, 0
        if "flops_per_token" in values and "peak_flops" in values:
            values["mfu"] = values["tokens_per_second"] * values.pop("flops_per_token") / values.pop("peak_flops")
        if self.rank != 0:
            return values
        line = (f"step {step:5d}  loss {values['loss']:8.4f}  grad_norm {values['grad_norm']:7.3f}  "
                f"lr {values['lr']:.2e}  memory {values['memory_gib']:5.2f}GiB  "
                f"tps {values['tokens_per_second']:8.0f}  mfu {100 * values.get('mfu', 0.0):5.2f}%")
        if "busy_fraction_attention" in values:
            line += (f"  busy A {values['busy_fraction_attention']:.2f} F {values['busy_fraction_expert']:.2f}"
                     f"  exposed comm {values['exposed_comm_fraction']:.2f}")
        logger.info(line)
        self.jsonl.write(json.dumps(values) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
        return values

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

"""Peak memory of one training step per pool, by category, on any device.

``metrics.memory_tracking_step = N`` runs step N under torch's ``MemTracker``
(torch.distributed._tools.mem_tracker), a dispatch mode that follows every tensor storage
the step allocates and files it as parameter, buffer, gradient, activation, temporary or
optimizer state. Why not the allocator: on CPU there is no allocator peak (peak RSS,
``memory_gib``, is dominated by the libraries and never goes down), and the same figure on
CPU and GPU is what lets a debug-model table say what a feature saves. The tracked step is
about 3x slower, so it is one step, not every step.

Logged (largest over the pool's ranks, each category on its own), in MiB:
``tracked_memory_mib`` (the whole job) and, in af_pipe runs, ``tracked_memory_mib_attention``
and ``tracked_memory_mib_expert``, each with ``tracked_<category>_mib[_<pool>]`` for
param, buffer, grad, activation, temp and optimizer.
"""

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

CATEGORIES = {"PARAM": "param", "BUFFER": "buffer", "GRAD": "grad", "ACT": "activation", "TEMP": "temp",
              "OPT": "optimizer"}


class _DeviceTotals(MemTracker):
    """MemTracker without its per-module statistics. Those hooks refuse a module called
    twice from the top level in one forward, which is how the AF-Pipe runtime and the
    pipeline schedules run micro-batches; the device totals by category do not need them."""

    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass


class StepMemoryTracker:
    """Context manager around one step; ``report`` then reduces the peaks over the job."""

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]):
        self.tracker = _DeviceTotals()
        self.tracker.track_external(*optimizers)
        # Parameters, buffers, and hooks that file gradients as gradients (FSDP2 writes its
        # reduced shards directly, so theirs count as temporaries).
        self.tracker._track_module_params_and_buffers(model, install_grad_hooks=True)

    def __enter__(self):
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        return self.tracker.__exit__(*exc)

    def peak_mib(self) -> dict[str, float]:
        """This rank's peak total and the categories at the peak, in MiB, summed over devices."""
        out = dict.fromkeys(["total", *CATEGORIES.values()], 0.0)
        for per_device in self.tracker.get_tracker_snapshot("peak").values():
            for key, nbytes in per_device.items():
                name = "total" if str(key) == "Total" else CATEGORIES.get(getattr(key, "name", ""), None)
                if name is not None:
                    out[name] += nbytes / 2**20
        return out

    def report(self, pools: tuple[str, ...], my_pool: str, world_size: int, device: torch.device) -> dict[str, float]:
        """Metrics of the tracked step: peaks per pool (max over its ranks) and for the job.
        Collective when ``world_size`` > 1."""
        mine = self.peak_mib()
        names = list(mine)
        table = torch.zeros(len(pools), len(names), dtype=torch.float64, device=device)
        table[pools.index(my_pool)] = torch.tensor([mine[n] for n in names], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(table, op=dist.ReduceOp.MAX)
        values = {}
        for i, pool in enumerate(pools):
            suffix = "" if len(pools) == 1 else f"_{pool}"
            for j, name in enumerate(names):
                key = "tracked_memory_mib" if name == "total" else f"tracked_{name}_mib"
                values[key + suffix] = round(table[i, j].item(), 3)
        if len(pools) > 1:
            values["tracked_memory_mib"] = max(values[f"tracked_memory_mib_{p}"] for p in pools)
        return values

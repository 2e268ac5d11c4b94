"""Run the trainer on N gloo ranks (spawned processes) or in this process, and collect
losses and full gradients for parity checks against the single-process reference."""

import os
from dataclasses import replace
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.models.qwen3_moe import qwen3_moe_flavors

# Test-only flavors for routing edge cases (registered in every spawned rank too, since
# the workers import this module to find their function).
_debug = qwen3_moe_flavors["debug"]
qwen3_moe_flavors.setdefault("debug_top1", replace(_debug, moe=replace(_debug.moe, top_k=1)))
qwen3_moe_flavors.setdefault("debug_top6", replace(_debug, moe=replace(_debug.moe, top_k=6)))

_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather_grads(model: torch.nn.Module, world_size: int) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, collected from whichever ranks hold it.

    Collective: call on all ranks. Sharded gradients are made whole on their mesh; then
    every rank's dict is gathered and merged (in the disaggregated layout each rank holds
    only some parameters), checking that replicas agree.
    """
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        grads[name] = grad.detach().clone().cpu()
    if world_size == 1:
        return grads
    everyone = [None] * world_size
    dist.all_gather_object(everyone, grads)
    merged: dict[str, torch.Tensor] = {}
    for rank_grads in everyone:
        for name, grad in rank_grads.items():
            if name in merged:
                torch.testing.assert_close(grad, merged[name], rtol=0, atol=0, msg=f"replicas of {name} differ")
            merged[name] = grad
    return merged


def route_everything_to_expert_0(trainer) -> None:
    """Edge case: a huge routing bias sends every token to expert 0 (and the next ones)."""
    for moe in trainer.moes:
        moe.expert_bias.copy_(-100.0 * torch.arange(moe.expert_bias.numel(), dtype=torch.float32))


def counts_first_receives(trainer) -> None:
    """af_pipe on gloo: receive rows the way NCCL needs (their counts first, then payloads
    posted in the order of the sends) instead of at once into bounded buffers."""
    runtime = trainer.layout.runtime
    assert runtime.max_rows is not None, "gloo should post row receives at once, bounded"
    runtime.max_rows = None


def counts_first_and_everything_to_expert_0(trainer) -> None:
    counts_first_receives(trainer)
    route_everything_to_expert_0(trainer)


def run_steps(config: JobConfig, cache_dir: str, steps: int, prepare=None) -> dict:
    """Train ``steps`` steps; gradients are captured at step 1 before clipping.

    Args:
        prepare: optional module-level function called with the trainer before step 1.
    """
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache_dir)
    if prepare is not None:
        prepare(trainer)
    try:
        inputs, labels = trainer.next_batch()
        trainer.optimizers.zero_grad()
        loss = trainer.forward_backward(inputs, labels)
        grads = gather_grads(trainer.model, trainer.world_size)
        metrics = trainer.optimizer_step(loss)
        first_loss = metrics["loss"]
        losses = [first_loss]
        for _ in range(steps - 1):
            losses.append(trainer.train_step()["loss"])
    finally:
        trainer.close()
    return {"loss": first_loss, "grads": grads, "losses": losses}


def run_train(config: JobConfig, cache_dir: str, stop_at: int | None = None) -> dict:
    """``Trainer.train`` as the entry point runs it; returns the logged metrics."""
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache_dir)
    try:
        return {"logged": trainer.train(stop_at=stop_at)}
    finally:
        trainer.close()


def _worker(rank: int, world_size: int, port: int, fn, args: tuple, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world_size: int, fn, *args) -> dict:
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out),
                           nprocs=world_size, join=True, start_method="spawn")
        return torch.load(out, weights_only=False)


def run_distributed(config: JobConfig, world_size: int, cache_dir: str, steps: int = 1, prepare=None) -> dict:
    """``run_steps`` on ``world_size`` gloo ranks; returns rank 0's result."""
    return spawn(world_size, run_steps, config, cache_dir, steps, prepare)


def run_single_fn(fn, *args):
    """``fn(*args)`` in this process as a single-process job (no torchrun variables)."""
    saved = {k: os.environ.pop(k) for k in _ENV_KEYS if k in os.environ}
    try:
        return fn(*args)
    finally:
        os.environ.update(saved)


def run_single(config: JobConfig, cache_dir: str, steps: int = 1, prepare=None) -> dict:
    """The reference: one process, no process group."""
    return run_single_fn(run_steps, config, cache_dir, steps, prepare)

"""Optimizer and LR schedule: torchtitan 0.2.2's containers, built from our config.

``OptimizersContainer`` and ``LRSchedulersContainer`` give DCP-compatible state dicts
(resharding across layouts through ``get_optimizer_state_dict``); we only translate our
config sections into their arguments.
"""

import torch
from torch import nn
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.lr_scheduler import build_lr_schedulers as _tt_build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config.job_config import LRScheduler as TTLRScheduler

from torchtitan_disagmoe.config.job_config import LRScheduler, Optimizer


def build_optimizers(model: nn.Module, config: Optimizer) -> OptimizersContainer:
    optimizer_cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[config.name]
    kwargs = {
        "lr": config.lr, "betas": (config.beta1, config.beta2), "eps": config.eps,
        "weight_decay": config.weight_decay,
        # The for-loop implementation: foreach kernels refuse DTensors that live on
        # different meshes (FSDP shards next to expert-parallel shards).
        "foreach": False, "fused": False,
    }
    return OptimizersContainer([model], optimizer_cls, kwargs)


def build_lr_schedulers(optimizers: OptimizersContainer, config: LRScheduler, steps: int) -> LRSchedulersContainer:
    """Linear warm-up, then decay (torchtitan's warmup-stable-decay schedule)."""
    tt_config = TTLRScheduler(warmup_steps=config.warmup_steps, decay_ratio=config.decay_ratio,
                              decay_type=config.decay_type, min_lr_factor=config.min_lr_factor)
    return _tt_build_lr_schedulers(optimizers, tt_config, steps)

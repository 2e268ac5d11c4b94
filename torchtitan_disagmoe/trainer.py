"""The colocated trainer: single process, FSDP2 data parallelism and expert parallelism.

Construction order (each step a ``build_*`` function or a component):
    config checks -> process group -> meshes -> tokenizer and data -> model on meta,
    parallelized, materialised, initialised -> optimizer and LR schedule -> metrics ->
    checkpoint (resumes from the latest one when enabled).

A training step: forward and backward on this rank's sequences, expert-gradient
reduction, global-norm clipping, aux-loss-free bias update, optimizer step.
"""

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_disagmoe.components.checkpoint import build_checkpointer
from torchtitan_disagmoe.components.load_balance import (
    configure_load_balance, load_imbalance, update_expert_bias)
from torchtitan_disagmoe.components.metrics import (
    MetricsLogger, peak_memory_gib, resolve_peak_flops, setup_logging)
from torchtitan_disagmoe.components.optimizer import build_lr_schedulers, build_optimizers
from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import config_to_dict
from torchtitan_disagmoe.data.dataloader import build_dataloader
from torchtitan_disagmoe.data.tokenizer import build_tokenizer, check_vocab
from torchtitan_disagmoe.distributed.expert_parallel import reduce_expert_grads
from torchtitan_disagmoe.distributed.parallel_dims import ParallelDims
from torchtitan_disagmoe.distributed.parallelize import moe_modules, parallelize_model
from torchtitan_disagmoe.distributed.utils import (
    all_reduce_mean, clip_grad_norm_, init_distributed, set_cpu_threads, world_info)
from torchtitan_disagmoe.models import ModelSpec, get_model_spec
from torchtitan_disagmoe.models.args import MoETransformerArgs
from torchtitan_disagmoe.models.init import init_model_weights_

logger = logging.getLogger("torchtitan_disagmoe")


def default_cache_dir() -> Path:
    """Where the built-in tokenizer and tokenized corpora are cached."""
    return Path(os.environ.get("DISAGMOE_CACHE_DIR", Path.home() / ".cache" / "torchtitan_disagmoe"))


def build_model(spec: ModelSpec, args: MoETransformerArgs, dims: ParallelDims, device: torch.device,
                seed: int, compile_enabled: bool) -> tuple[nn.Module, list[nn.Parameter]]:
    """Build on meta, parallelize, materialise on ``device``, initialise by parameter name.

    Returns:
        (model, expert-parallel parameters).
    """
    with torch.device("meta"):
        model = spec.model_cls(args)
    expert_params = parallelize_model(model, dims, compile_enabled)
    model.to_empty(device=device)
    init_model_weights_(model, lambda name: spec.init_rule(name, args.dim), seed)
    return model, expert_params


class Trainer:
    def __init__(self, config: JobConfig, cache_dir: str | Path | None = None):
        self.config = config
        self.rank, _, self.world_size = world_info()
        config.validate(self.world_size)  # before any process group can hang
        setup_logging(self.rank)
        if config.job.print_config:
            logger.info(f"config: {json.dumps(config_to_dict(config), indent=2)}")
        self.device = init_distributed(self.world_size)
        if self.device.type == "cpu":
            threads = set_cpu_threads(config.training.threads_per_rank)
            logger.info(f"CPU run: {threads} torch threads per rank")
        torch.manual_seed(config.training.seed)

        self.dims = ParallelDims(self.world_size, config.expert_parallel_degree(self.world_size))
        self.dims.build_meshes(self.device.type)
        self.spec = get_model_spec(config.model.name)
        self.model_args = self.spec.get_flavor(config.model.flavor)
        self.model_args.validate_seq_len(config.training.seq_len)

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        tokenizer = build_tokenizer(config.model.tokenizer_path or None, self.model_args.vocab_size, cache)
        check_vocab(tokenizer, self.model_args.vocab_size)
        t = config.training
        self.dataloader = build_dataloader(
            t.dataset, t.dataset_path or None, tokenizer, t.seq_len, t.local_batch_size,
            dp_rank=self.rank, dp_degree=self.dims.dp, seed=t.seed, cache_dir=cache)

        self.model, self.expert_params = build_model(
            self.spec, self.model_args, self.dims, self.device, t.seed, config.compile.enable)
        self.moes = moe_modules(self.model)
        configure_load_balance(self.moes, config.moe.load_balance, config.moe.aux_loss_coeff)
        for moe in self.moes:
            moe.experts.use_grouped_mm = config.moe.use_grouped_mm
        total, active = self.model_args.num_params()
        logger.info(f"model {config.model.name}/{config.model.flavor}: {total:,} parameters, "
                    f"{active:,} active per token; layout {self.dims}")

        self.optimizers = build_optimizers(self.model, config.optimizer)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, config.lr_scheduler, t.steps)
        self.step = 0
        self.checkpointer = build_checkpointer(config, self)
        self.peak_flops, peak_source = resolve_peak_flops(config.metrics.peak_flops, self.device)
        logger.info(f"peak FLOP/s per rank for MFU: {self.peak_flops:.3e} ({peak_source})")
        self.metrics = MetricsLogger(config.job.dump_folder, self.rank,
                                     config.metrics.enable_tensorboard, config.metrics.log_freq)
        self.data_iter = iter(self.dataloader)

    # ---- one step -------------------------------------------------------------------
    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of this rank's sequences (mean over its tokens), gradients accumulated.

        Expert gradients are reduced here too, so that afterwards every gradient is that
        of the mean loss over all data-parallel ranks (what a single process computes).
        """
        logits = self.model(inputs.to(self.device))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(self.device).flatten())
        loss.backward()
        if self.expert_params:
            reduce_expert_grads(self.expert_params, self.dims.expert_mesh, self.dims.dp)
        return loss.detach()

    def train_step(self) -> dict[str, float]:
        inputs, labels = next(self.data_iter)
        self.optimizers.zero_grad()
        loss = self.forward_backward(inputs, labels)
        return self.optimizer_step(loss, inputs.numel() * self.dims.dp)

    def optimizer_step(self, loss: torch.Tensor, global_tokens: int) -> dict[str, float]:
        """Clip, update the routing bias, step optimizer and LR; returns step metrics."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm_(params, self.config.training.max_norm, self.world_size)
        counts_LE = update_expert_bias(
            self.moes, self.config.moe.bias_update_rate,
            self.config.moe.load_balance in ("aux_loss_free", "both"), self.world_size)
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        self.optimizers.step()
        self.lr_schedulers.step()
        self.metrics.count_tokens(global_tokens)
        values = {"loss": all_reduce_mean(loss, self.world_size).item(),
                  "grad_norm": grad_norm.item(), "lr": lr}
        if counts_LE is not None:
            values["load_imbalance"] = load_imbalance(counts_LE)
        aux = [m.last_aux_loss for m in self.moes if m.last_aux_loss is not None]
        if aux:
            values["aux_loss"] = all_reduce_mean(torch.stack(aux).sum(), self.world_size).item()
        return values

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        """Run until ``training.steps`` (or ``stop_at``, as if interrupted there).

        Returns:
            The logged metrics of this run (on every rank).
        """
        steps = self.config.training.steps
        stop_at = steps if stop_at is None else min(stop_at, steps)
        seq_len = self.config.training.seq_len
        flops_per_token = self.model_args.flops_per_token(seq_len)
        logged = []
        if self.step >= steps:
            logger.info(f"checkpoint is at step {self.step} >= training.steps = {steps}: nothing to do")
        while self.step < stop_at:
            self.step += 1
            values = self.train_step()
            self.checkpointer.save(self.step, last_step=self.step == steps)
            if self.metrics.should_log(self.step, steps):
                values.update(memory_gib=peak_memory_gib(self.device), flops_per_token=flops_per_token,
                              peak_flops=self.peak_flops * self.world_size)
                logged.append(self.metrics.log(self.step, values))
        return logged

    def close(self) -> None:
        self.metrics.close()
        self.checkpointer.close()

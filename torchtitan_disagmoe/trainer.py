"""The trainer, for every layout (single process, colocated FSDP2 + EP, af_pipe).

Construction order (each step a ``build_*`` function or a component):
    config checks -> process group -> layout (meshes, model on meta, parallelized or cut
    to this rank's part, materialised, initialised by name) -> data (ranks that read it)
    -> optimizer and LR schedule -> metrics -> checkpoint (resumes from the newest one).

A training step: forward and backward (``layouts.py``), gradient reduction, global-norm
clipping, aux-loss-free bias update, optimizer step, metrics.
"""

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

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
from torchtitan_disagmoe.distributed.utils import (
    clip_grad_norm_, init_distributed, set_cpu_threads, world_info)
from torchtitan_disagmoe.layouts import build_layout
from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.moe import GroupedExperts, MoE

logger = logging.getLogger("torchtitan_disagmoe")


def default_cache_dir() -> Path:
    """Where the built-in tokenizer and tokenized corpora are cached."""
    return Path(os.environ.get("DISAGMOE_CACHE_DIR", Path.home() / ".cache" / "torchtitan_disagmoe"))


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

        self.spec = get_model_spec(config.model.name)
        self.model_args = self.spec.get_flavor(config.model.flavor)
        self.layout = build_layout(config, self.spec, self.model_args, self.rank, self.world_size, self.device)
        self.model = self.layout.model
        self.moes = [m for m in self.model.modules() if isinstance(m, MoE) and m.router is not None]
        configure_load_balance(self.moes, config.moe.load_balance, config.moe.aux_loss_coeff)
        for module in self.model.modules():
            if isinstance(module, GroupedExperts):
                module.use_grouped_mm = config.moe.use_grouped_mm
        total, active = self.model_args.num_params()
        logger.info(f"model {config.model.name}/{config.model.flavor}: {total:,} parameters, "
                    f"{active:,} active per token; {self.layout.describe()}")

        t = config.training
        self.global_tokens = t.local_batch_size * t.seq_len * self.layout.dp_degree
        self.dataloader = self._build_dataloader(cache_dir)
        self.optimizers = build_optimizers(self.model, config.optimizer)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, config.lr_scheduler, t.steps)
        self.step = 0
        self.checkpointer = build_checkpointer(config, self)
        self.peak_flops, peak_source = resolve_peak_flops(config.metrics.peak_flops, self.device)
        logger.info(f"peak FLOP/s per rank for MFU: {self.peak_flops:.3e} ({peak_source})")
        self.metrics = MetricsLogger(config.job.dump_folder, self.rank,
                                     config.metrics.enable_tensorboard, config.metrics.log_freq)
        self.data_iter = iter(self.dataloader) if self.dataloader is not None else None

    def _build_dataloader(self, cache_dir):
        """This rank's slice of every global batch; None on ranks that read no data."""
        if not self.layout.has_data:
            return None
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        tokenizer = build_tokenizer(self.config.model.tokenizer_path or None, self.model_args.vocab_size, cache)
        check_vocab(tokenizer, self.model_args.vocab_size)
        t = self.config.training
        return build_dataloader(t.dataset, t.dataset_path or None, tokenizer, t.seq_len, t.local_batch_size,
                                dp_rank=self.layout.dp_rank, dp_degree=self.layout.dp_degree, seed=t.seed,
                                cache_dir=cache)

    # ---- one step -------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return next(self.data_iter) if self.data_iter is not None else (None, None)

    def forward_backward(self, inputs, labels) -> torch.Tensor | None:
        """Forward and backward of this rank's part of the global batch.

        Afterwards every gradient is that of the mean loss over the global batch (what a
        single process computes). Returns this rank's loss where it has one, else None.
        """
        loss = self.layout.forward_backward(inputs, labels)
        self.layout.finish_gradients()
        return loss

    def train_step(self) -> dict[str, float]:
        inputs, labels = self.next_batch()
        self.optimizers.zero_grad()
        loss = self.forward_backward(inputs, labels)
        return self.optimizer_step(loss)

    def optimizer_step(self, loss: torch.Tensor | None) -> dict[str, float]:
        """Clip, update the routing bias, step optimizer and LR; returns step metrics."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm_(params, self.config.training.max_norm, self.world_size,
                                    self.layout.plain_param_replicas)
        counts_LE = update_expert_bias(
            self.moes, self.config.moe.bias_update_rate,
            self.config.moe.load_balance in ("aux_loss_free", "both"), self.layout.router_group,
            self.world_size)
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        self.optimizers.step()
        self.lr_schedulers.step()
        self.metrics.count_tokens(self.global_tokens)
        values = {"loss": self.layout.mean_over_batch(None if loss is None else loss.item()),
                  "grad_norm": grad_norm.item(), "lr": lr}
        if counts_LE is not None:  # rank 0 (the one that logs) always routes
            values["load_imbalance"] = load_imbalance(counts_LE)
        aux = [m.last_aux_loss for m in self.moes if m.last_aux_loss is not None]
        if self.config.moe.load_balance in ("aux_loss", "both"):
            values["aux_loss"] = self.layout.mean_over_batch(torch.stack(aux).sum().item() if aux else None)
        values.update(self.layout.step_metrics(self.device))
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
            traced = self.step == self.config.metrics.timeline_step and self.layout.has_timeline
            values = self._traced_step() if traced else self.train_step()
            self.checkpointer.save(self.step, last_step=self.step == steps)
            if self.metrics.should_log(self.step, steps):
                values.update(memory_gib=peak_memory_gib(self.device), flops_per_token=flops_per_token,
                              peak_flops=self.peak_flops * self.world_size)
                logged.append(self.metrics.log(self.step, values))
        return logged

    def _traced_step(self) -> dict[str, float]:
        """A training step whose per-rank action timeline (and optionally a profiler
        trace) is written under ``<dump_folder>/timeline``."""
        folder = Path(self.config.job.dump_folder) / "timeline"
        folder.mkdir(parents=True, exist_ok=True)
        profiler = contextlib.nullcontext()
        if self.config.metrics.enable_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
        with profiler as prof:
            values = self.train_step()
        if prof is not None:
            prof.export_chrome_trace(str(folder / f"profile_rank{self.rank}.json"))
        self.layout.save_timeline(folder, self.step)
        logger.info(f"timeline of step {self.step} written to {folder}")
        return values

    def close(self) -> None:
        self.metrics.close()
        self.checkpointer.close()

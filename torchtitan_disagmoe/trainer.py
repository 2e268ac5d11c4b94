"""The trainer, for every layout (single process, colocated FSDP2 + EP, af_pipe).

Construction order (each step a ``build_*`` function or a component):
    config checks -> process group -> layout (meshes, model on meta, parallelized or cut
    to this rank's part, materialised, initialised by name) -> data (ranks that read it)
    -> optimizer and LR schedule -> metrics -> checkpoint (resumes from the newest one).

A training step: forward and backward (``layouts.py``), gradient reduction, global-norm
clipping, aux-loss-free bias update, optimizer step, metrics.
"""

import contextlib
import gc
import json
import logging
import math
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan.tools.utils import GarbageCollection

from torchtitan_disagmoe.components.checkpoint import build_checkpointer
from torchtitan_disagmoe.components.load_balance import (
    configure_load_balance, load_imbalance, update_expert_bias)
from torchtitan_disagmoe.components.memory_tracking import StepMemoryTracker
from torchtitan_disagmoe.components.metrics import (
    MetricsLogger, peak_memory_gib, resolve_peak_flops, setup_logging)
from torchtitan_disagmoe.components.optimizer import build_lr_schedulers, build_optimizers
from torchtitan_disagmoe.components.preflight import preflight
from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import config_to_dict
from torchtitan_disagmoe.data.dataloader import build_dataloader
from torchtitan_disagmoe.data.tokenizer import build_tokenizer
from torchtitan_disagmoe.distributed.failure import (
    Activity, Heartbeats, TrainingFailure, Watchdog, failure_report)
from torchtitan_disagmoe.distributed.utils import (
    clip_grad_norm_, init_distributed, set_cpu_threads, set_pg_timeouts, world_info)
from torchtitan_disagmoe.layouts import build_layout
from torchtitan_disagmoe.models import get_model_spec
from torchtitan_disagmoe.models.activation_checkpoint import ActivationCheckpointing, apply_activation_checkpointing
from torchtitan_disagmoe.models.moe import GroupedExperts, MoE

logger = logging.getLogger("torchtitan_disagmoe")


def default_cache_dir() -> Path:
    """Where the built-in tokenizer and tokenized corpora are cached."""
    return Path(os.environ.get("DISAGMOE_CACHE_DIR", Path.home() / ".cache" / "torchtitan_disagmoe"))


class NonFiniteError(TrainingFailure):
    """NaN or Inf in the loss or a gradient (``training.skip_nonfinite_steps`` = false)."""


class LauncherStop(RuntimeError):
    """SIGTERM: the launcher stops this rank, usually because another rank failed."""


def _raise_launcher_stop(signum, frame):
    raise LauncherStop("stopped by the launcher (SIGTERM), usually because another rank failed")


class Trainer:
    def __init__(self, config: JobConfig, cache_dir: str | Path | None = None):
        self.config = config
        self.rank, _, self.world_size = world_info()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        config.validate(self.world_size)  # before any process group can hang
        preflight(config, self.cache_dir)
        setup_logging(self.rank)
        if config.job.print_config:
            logger.info(f"config: {json.dumps(config_to_dict(config), indent=2)}")
        c = config.comm
        self.device = init_distributed(self.world_size, timeout_s=c.init_timeout_seconds)
        self.activity = Activity(rank=self.rank, role="single process" if self.world_size == 1 else "colocated")
        self.heartbeats = Heartbeats.connect(self.world_size)
        self.watchdog = Watchdog(self.activity, self.heartbeats, c.heartbeat_seconds,
                                 deadline_s=c.init_timeout_seconds + 30)
        if self.world_size > 1:
            self.watchdog.start()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, _raise_launcher_stop)
        if self.device.type == "cpu":
            threads = set_cpu_threads(config.training.threads_per_rank)
            logger.info(f"CPU run: {threads} torch threads per rank")
        torch.manual_seed(config.training.seed)

        self.spec = get_model_spec(config.model.name)
        self.model_args = self.spec.get_flavor(config.model.flavor)
        self.layout = build_layout(config, self.spec, self.model_args, self.rank, self.world_size, self.device)
        self.model = self.layout.model
        if hasattr(self.layout, "role"):
            self.activity.role = str(self.layout.role)
        ac = ActivationCheckpointing(config.activation_checkpoint.mode, config.activation_checkpoint.selective_ac_option)
        apply_activation_checkpointing(self.model, ac)
        if hasattr(self.layout, "runtime"):
            self.layout.runtime.activity = self.activity
            self.layout.runtime.timeout = timedelta(seconds=c.init_timeout_seconds)
            self.layout.runtime.activation_checkpointing = ac
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
        self.skipped_steps = 0
        self.dataloader = self._build_dataloader()
        self.optimizers = build_optimizers(self.model, config.optimizer)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, config.lr_scheduler, t.steps)
        self.step = 0
        self.checkpointer = build_checkpointer(config, self)
        self.peak_flops, peak_source = resolve_peak_flops(config.metrics.peak_flops, self.device)
        logger.info(f"peak FLOP/s per rank for MFU: {self.peak_flops:.3e} ({peak_source})")
        self.metrics = MetricsLogger(config.job.dump_folder, self.rank,
                                     config.metrics.enable_tensorboard, config.metrics.log_freq)
        self.data_iter = iter(self.dataloader) if self.dataloader is not None else None
        # torchtitan's scheduled garbage collection: automatic collection off during steps
        # (it ran inside stage calls and slowed them 11-16% here), generation 1 every
        # gc_freq steps; close() turns automatic collection back on.
        self._gc_was_enabled = gc.isenabled()
        self.gc = GarbageCollection(gc_freq=t.gc_freq)

    def _build_dataloader(self):
        """This rank's slice of every global batch; None on ranks that read no data."""
        if not self.layout.has_data:
            return None
        cache = self.cache_dir
        tokenizer = build_tokenizer(self.config.model.tokenizer_path or None, self.model_args.vocab_size, cache)
        # The vocabulary was checked against the model before start-up (components/preflight.py).
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
        self.activity.set("reading the batch")
        inputs, labels = self.next_batch()
        self.optimizers.zero_grad()
        self.activity.set("forward and backward")
        loss = self.forward_backward(inputs, labels)
        return self.optimizer_step(loss)

    def optimizer_step(self, loss: torch.Tensor | None) -> dict[str, float]:
        """Clip, update the routing bias, step optimizer and LR; returns step metrics.

        A non-finite loss or gradient norm (the same value on every rank: both are reduced
        over the job) stops the run, or skips this update with ``skip_nonfinite_steps``.
        """
        self.activity.set("gradient clipping and optimizer step")
        params = [p for p in self.model.parameters() if p.requires_grad]
        mean_loss = self.layout.mean_over_batch(None if loss is None else loss.item())
        grad_norm = clip_grad_norm_(params, self.config.training.max_norm, self.world_size,
                                    self.layout.plain_param_replicas)
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        values = {"loss": mean_loss, "grad_norm": grad_norm.item(), "lr": lr}
        if not (math.isfinite(mean_loss) and math.isfinite(values["grad_norm"])):
            return self._nonfinite_step(values)
        counts_LE = update_expert_bias(
            self.moes, self.config.moe.bias_update_rate,
            self.config.moe.load_balance in ("aux_loss_free", "both"), self.layout.router_group,
            self.world_size)
        self.optimizers.step()
        self.lr_schedulers.step()
        self.metrics.count_tokens(self.global_tokens)
        if counts_LE is not None:  # rank 0 (the one that logs) always routes
            values["load_imbalance"] = load_imbalance(counts_LE)
        aux = [m.last_aux_loss for m in self.moes if m.last_aux_loss is not None]
        if self.config.moe.load_balance in ("aux_loss", "both"):
            values["aux_loss"] = self.layout.mean_over_batch(torch.stack(aux).sum().item() if aux else None)
        values.update(self.layout.step_metrics(self.device))
        if self.config.compile.enable:
            values["compiled_graphs"] = self._compiled_graphs()
        if self.skipped_steps:
            values["skipped_steps"] = self.skipped_steps
        return values

    def _compiled_graphs(self) -> float:
        """Graphs torch.compile built so far, summed over ranks: growth after warm-up means
        recompilation (collective)."""
        from torch._dynamo.utils import counters

        total = torch.tensor([float(counters["stats"]["unique_graphs"])], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        return total.item()

    def _nonfinite_step(self, values: dict[str, float]) -> dict[str, float]:
        """Name the parameters with NaN/Inf gradients on every rank (with their pool), then
        stop or skip. Collective, and every rank takes this path together."""
        bad = [name for name, p in self.model.named_parameters() if p.grad is not None
               and not torch.isfinite(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).all()]
        everyone = [(self.activity.role, bad)]
        if self.world_size > 1:
            everyone = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, (self.activity.role, bad))
        where = sorted({f"{name} ({role})" for role, names in everyone for name in names})
        shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
        message = (f"non-finite values at step {self.step}: loss {values['loss']}, gradient norm "
                   f"{values['grad_norm']}; parameters with NaN/Inf gradients: {shown or 'none (loss only)'}")
        if not self.config.training.skip_nonfinite_steps:
            raise NonFiniteError(message + ". Stopped before the optimizer step; the last checkpoint is "
                                 "intact. Lower the learning rate, resume, or set training.skip_nonfinite_steps")
        logger.warning(message + "; skipping this step's update (training.skip_nonfinite_steps)")
        self.skipped_steps += 1
        self.optimizers.zero_grad()
        for moe in self.moes:  # this step's routing counts must not reach the next bias update
            moe.tokens_per_expert.zero_()
        self.layout.step_metrics(self.device)  # collective: keep every rank's counters in step
        return {**values, "skipped_steps": self.skipped_steps}

    def train(self, stop_at: int | None = None) -> list[dict[str, float]]:
        """Run until ``training.steps`` (or ``stop_at``, as if interrupted there).

        Any failure in a step (an exception here, a peer that died or timed out, SIGTERM
        from the launcher) becomes a ``TrainingFailure`` whose message says which rank
        failed, doing what, and which ranks stopped reporting (distributed/failure.py).

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
        first_step = self.step + 1
        self.activity.set("starting the training loop")
        self.activity.in_step = True
        try:
            while self.step < stop_at:
                self.step += 1
                self.activity.step = self.step
                traced = self.step == self.config.metrics.timeline_step and self.layout.has_timeline
                memory_tracked = self.step == self.config.metrics.memory_tracking_step
                if memory_tracked:
                    values = self._memory_tracked_step()
                else:
                    values = self._traced_step() if traced else self.train_step()
                self.gc.run(self.step)
                self.activity.set("saving a checkpoint")
                self.checkpointer.save(self.step, last_step=self.step == steps)
                if self.metrics.should_log(self.step, steps) or memory_tracked:
                    values.update(memory_gib=peak_memory_gib(self.device), flops_per_token=flops_per_token,
                                  peak_flops=self.peak_flops * self.world_size)
                    logged.append(self.metrics.log(self.step, values))
                if self.step == first_step:
                    self._use_train_timeouts()
                self.activity.set("between steps")
        except NonFiniteError as e:
            self._publish_failure()
            logger.error(str(e))
            raise
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            self._publish_failure()
            report = failure_report(e, self.activity, self.heartbeats, self.world_size,
                                    stale_s=max(3.0, 3 * self.config.comm.heartbeat_seconds))
            logger.error(report)
            raise TrainingFailure(report) from e
        finally:
            self.activity.in_step = False
        self.activity.set("finished")
        return logged

    def _use_train_timeouts(self) -> None:
        """After the first step (warm-up, compilation), waits get the shorter timeout."""
        c = self.config.comm
        timeout = timedelta(seconds=c.train_timeout_seconds)
        set_pg_timeouts(timeout)
        if hasattr(self.layout, "runtime"):
            self.layout.runtime.timeout = timeout
        # Past the timeouts, the watchdog ends a rank stuck where no timeout applies.
        self.watchdog.deadline_s = c.train_timeout_seconds + 30

    def _publish_failure(self) -> None:
        """Mark this rank failed in the store; from here on the launcher's SIGTERM must not
        interrupt the (bounded) report."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.watchdog.stop()
        try:
            self.heartbeats.publish(self.activity, failed=True)
        except Exception:
            pass

    def _memory_tracked_step(self) -> dict[str, float]:
        """One step under MemTracker; adds its peak memory per pool (collective)."""
        tracker = StepMemoryTracker(self.model, self.optimizers.optimizers)
        with tracker:
            values = self.train_step()
        role = getattr(self.layout, "role", None)  # af_pipe: two pools
        pools = ("attention", "expert") if role is not None else ("all",)
        return {**values, **tracker.report(pools, role.pool if role is not None else "all", self.world_size,
                                           self.device)}

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
        if self._gc_was_enabled:
            gc.enable()
        self.watchdog.stop()
        if self.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.metrics.close()
        self.checkpointer.close()

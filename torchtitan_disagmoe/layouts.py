"""The two ways a job places the model on its ranks, behind one small interface.

- ``ColocatedLayout`` (``disagmoe.mode = "colocated"``): every rank holds attention
  (FSDP2 over all ranks) and a slice of the experts (expert parallelism, all-to-all).
- ``PipelinedColocatedLayout`` (colocated with ``parallelism.pipeline_parallel_degree`` >
  1): the same within each pipeline rank, layers split into stages run by
  torch.distributed.pipelining's 1F1B / Interleaved1F1B / DualPipeV.
- ``DisaggregatedLayout`` (``"af_pipe"``): attention pool and expert pool on disjoint
  ranks, joined by M2N dispatch / N2M combine (distributed/af_engine.py).

The trainer only sees: the model part to optimise and checkpoint, which data-parallel
slice of the batch this rank reads (if any), ``forward_backward``, and how to average a
value over the job. After ``forward_backward`` every gradient on every rank is that of the
mean loss over the global batch, i.e. what a single process computes.
"""

import functools
import json
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torchtitan_disagmoe.components.metrics import peak_memory_gib
from torchtitan_disagmoe.components.mixed_precision import autocast_unsharded, fsdp_mp_policy
from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.distributed.af_engine import AFPipeRuntime
from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims
from torchtitan_disagmoe.distributed.disagg_model import compile_stages, shard_attention_group, split_model
from torchtitan_disagmoe.distributed.dispatch import (COMBINE, COMBINE_GRAD, DISPATCH, DISPATCH_GRAD, RESIDUAL,
                                                      RESIDUAL_GRAD)
from torchtitan_disagmoe.distributed.expert_parallel import AllToAllTokenDispatcher, reduce_expert_grads
from torchtitan_disagmoe.distributed.parallel_dims import ParallelDims
from torchtitan_disagmoe.distributed.parallelize import parallelize_model
from torchtitan_disagmoe.distributed.pipeline_parallel import (build_pipeline_schedule, split_into_stages,
                                                               stage_ids_for_rank)
from torchtitan_disagmoe.models import ModelSpec
from torchtitan_disagmoe.models.args import MoETransformerArgs
from torchtitan_disagmoe.models.init import init_model_weights_
from torchtitan_disagmoe.models.moe import MoE

logger = logging.getLogger("torchtitan_disagmoe")


def materialize(model: nn.Module, spec: ModelSpec, args: MoETransformerArgs, device: torch.device, seed: int) -> None:
    """Allocate a (possibly cut and sharded) meta model on ``device`` and initialise it by name."""
    model.to_empty(device=device)
    init_model_weights_(model, lambda name: spec.init_rule(name, args.dim), seed)


def _overlap_chunks(config: JobConfig) -> int:
    """Token chunks of the overlapping all-to-all dispatcher; 0: the plain one."""
    par = config.parallelism
    return par.expert_parallel_overlap_chunks if par.expert_parallel_overlap else 0


def _precision(config: JobConfig) -> str:
    t = config.training
    return "" if t.mixed_precision_param == "float32" else f"; {t.mixed_precision_param} compute, fp32 master weights"


def _sum_over_job(value: float, world_size: int) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


class ColocatedLayout:
    def __init__(self, config: JobConfig, spec: ModelSpec, args: MoETransformerArgs, rank: int,
                 world_size: int, device: torch.device):
        self.rank, self.world_size, self.device, self.config = rank, world_size, device, config
        replicate, _ = config.fsdp_degrees(world_size)
        self.dims = ParallelDims(world_size, config.expert_parallel_degree(world_size), dp_replicate=replicate)
        self.dims.build_meshes(device.type)
        with torch.device("meta"):
            self.model = spec.model_cls(args)
        self.expert_params = parallelize_model(self.model, self.dims, config.compile.enable,
                                               overlap_chunks=_overlap_chunks(config),
                                               mp_policy=fsdp_mp_policy(config.training))
        materialize(self.model, spec, args, device, config.training.seed)
        self.dp_rank, self.dp_degree, self.has_data = rank, world_size, True
        self.router_group = None  # load-balance counts are summed over all ranks
        self.plain_param_replicas = world_size
        self.has_timeline = False  # no action list to draw

    def describe(self) -> str:
        if self.world_size == 1:
            return f"single process{_precision(self.config)}"
        sharding = (f"HSDP {self.dims.dp_replicate} x {self.world_size // self.dims.dp_replicate}"
                    if self.dims.dp_replicate > 1 else "FSDP2 over all")
        return (f"colocated: {self.world_size} ranks, {sharding}, expert parallel {self.dims.ep}{self._overlap()}"
                f"{_precision(self.config)}")

    def _overlap(self) -> str:
        chunks = _overlap_chunks(self.config)
        return f", all-to-all overlapped over {chunks} token chunks" if chunks else ""

    def forward_backward(self, inputs, labels) -> torch.Tensor:
        with autocast_unsharded(self.config.training, self.device.type, sharded=self.dims.fsdp_enabled):
            logits = self.model(inputs.to(self.device))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(self.device).flatten())
        loss.backward()
        return loss.detach()

    def finish_gradients(self) -> None:
        if self.expert_params:
            reduce_expert_grads(self.expert_params, self.dims.expert_mesh, self.dims.dp)

    def mean_over_batch(self, value: float | None) -> float:
        """Average of a per-rank value (every rank holds one) over the data-parallel ranks."""
        return _sum_over_job(value, self.world_size) / self.world_size


    def step_metrics(self, device: torch.device) -> dict[str, float]:
        """All-to-all bytes sent to other ranks per step, all ranks (collective)."""
        if not self.dims.ep_enabled:  # the same on every rank (a pipeline stage may hold no MoE layer)
            return {}
        dispatchers = [m.dispatcher for m in self.model.modules()
                       if isinstance(getattr(m, "dispatcher", None), AllToAllTokenDispatcher)]
        values = torch.zeros(2, dtype=torch.float64)
        for d in dispatchers:
            values += torch.tensor([d.bytes_sent["dispatch"], d.bytes_sent["combine"]], dtype=torch.float64)
            d.bytes_sent = {"dispatch": 0, "combine": 0}
        dist.all_reduce(values)
        return {"dispatch_bytes": values[0].item(), "combine_bytes": values[1].item()}



class PipelinedColocatedLayout(ColocatedLayout):
    """Colocated EP + FSDP2 within each pipeline rank, layers split into pipeline stages.

    Ranks form a (pp, dp) grid (``ParallelDims``); this rank holds the stages
    ``stage_ids`` and ``model`` is the whole model pruned to them (full parameter names).
    ``forward_backward`` runs one step of the schedule over ``local_batch_size /
    pipeline_parallel_microbatch_size`` micro-batches; the ranks of the last stage hold
    the loss.
    """

    def __init__(self, config: JobConfig, spec: ModelSpec, args: MoETransformerArgs, rank: int,
                 world_size: int, device: torch.device):
        par, t = config.parallelism, config.training
        self.rank, self.world_size, self.device, self.config = rank, world_size, device, config
        self.dims = ParallelDims(world_size, config.expert_parallel_degree(world_size), par.pipeline_parallel_degree)
        self.dims.build_meshes(device.type)
        per_rank = par.stages_per_rank(args.n_layers)
        self.num_stages = self.dims.pp * per_rank
        self.stage_ids = stage_ids_for_rank(self.dims.pp_rank(rank), self.dims.pp, per_rank,
                                            par.pipeline_parallel_schedule)
        self.microbatches = t.local_batch_size // par.pipeline_parallel_microbatch_size
        with torch.device("meta"):
            self.model = spec.model_cls(args)
        stage_modules = split_into_stages(self.model, self.stage_ids, self.num_stages)
        self.expert_params = parallelize_model(self.model, self.dims, config.compile.enable, stage_modules,
                                               overlap_chunks=_overlap_chunks(config),
                                               mp_policy=fsdp_mp_policy(config.training))
        materialize(self.model, spec, args, device, t.seed)
        self.schedule = build_pipeline_schedule(
            stage_modules, self.stage_ids, self.num_stages, self.dims, par.pipeline_parallel_schedule,
            self.microbatches, (par.pipeline_parallel_microbatch_size, t.seq_len), args.dim, args.vocab_size, device)
        for module in self.model.modules():  # each micro-batch's balance loss is 1/M of the step's
            if isinstance(module, MoE):
                module.aux_loss_scale = 1.0 / self.microbatches
        self.has_first, self.has_last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        self.dp_rank, self.dp_degree, self.has_data = self.dims.dp_rank(rank), self.dims.dp, True
        # Ranks holding the same layers for other sequences sum the load-balance counts.
        self.router_group = self.dims.dp_mesh.get_group()
        self.plain_param_replicas = self.dims.dp
        self.has_timeline = False

    def describe(self) -> str:
        par = self.config.parallelism
        return (f"colocated pipeline: pp {self.dims.pp} x dp {self.dims.dp} ranks, {par.pipeline_parallel_schedule}, "
                f"{self.num_stages} stages, {self.microbatches} micro-batches; FSDP2 over dp, expert parallel "
                f"{self.dims.ep}{self._overlap()}{_precision(self.config)}; this rank: stages {self.stage_ids}")

    def forward_backward(self, inputs, labels) -> torch.Tensor | None:
        args = (inputs.to(self.device),) if self.has_first else ()
        target = labels.to(self.device) if self.has_last else None
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None, return_outputs=False)
        # Each micro-batch loss is already divided by the micro-batch count.
        return torch.stack(losses).sum().detach() if self.has_last else None

    def mean_over_batch(self, value: float | None) -> float:
        """Average over the data-parallel ranks of a value held by one pipeline rank's
        ranks (the loss: the last stage; pass None elsewhere), or a per-layer sum held in
        parts by every pipeline rank (aux loss)."""
        return _sum_over_job(value or 0.0, self.world_size) / self.dims.dp

class DisaggregatedLayout:
    def __init__(self, config: JobConfig, spec: ModelSpec, args: MoETransformerArgs, rank: int,
                 world_size: int, device: torch.device):
        d = config.disagmoe
        self.rank, self.world_size, self.device = rank, world_size, device
        self.config = config
        self.dims = DisaggDims(d.attention_ranks, d.expert_ranks, d.pipeline_depth, args.n_layers,
                               args.moe.num_experts, expert_replicas=d.expert_replicas)
        self.dims.validate(world_size)
        # FSDP2 (HSDP with data_parallel_replicate_degree > 1) over each attention group;
        # data_parallel_shard_degree = 1 keeps plain replicas, averaged by all-reduce.
        replicate, shard = config.fsdp_degrees(self.dims.dp)
        self.dims.dp_replicate = replicate if shard > 1 else 1
        self.dims.build_meshes(device.type, rank)
        self.role = self.dims.role(rank)
        with torch.device("meta"):
            self.model = spec.model_cls(args)
        self.expert_params = split_model(self.model, self.dims, rank)
        if config.compile.enable:
            compile_stages(self.model, config.compile.components)
        self.fsdp = self.role.pool == "attention" and shard > 1
        fsdp_units = (shard_attention_group(self.model, self.dims.fsdp_mesh(rank), args.n_layers,
                                            fsdp_mp_policy(config.training)) if self.fsdp else {})
        materialize(self.model, spec, args, device, config.training.seed)
        moe_layers = [args.is_moe_layer(layer) for layer in range(args.n_layers)]
        self.runtime = AFPipeRuntime(self.model, self.dims, rank, moe_layers, args.dim, args.moe.top_k, device,
                                     microbatches=d.microbatches, max_inflight=d.max_inflight,
                                     transfer_dtype=getattr(torch, d.transfer_dtype),
                                     tokens_per_microbatch=config.training.local_batch_size
                                     * config.training.seq_len // d.microbatches)
        self.runtime.fsdp_units = fsdp_units
        self.runtime.forward_context = functools.partial(autocast_unsharded, config.training, device.type, self.fsdp)
        for module in self.model.modules():  # each micro-batch's balance loss is 1/M of the step's
            if isinstance(module, MoE):
                module.aux_loss_scale = 1.0 / d.microbatches
        self.has_data = self.role.pool == "attention"
        self.dp_rank, self.dp_degree = (self.role.index if self.has_data else 0), self.dims.dp
        self.router_group = self.dims.my_group(rank)
        self.plain_param_replicas = self.dims.dp  # attention parameters: one copy per group rank
        self.has_timeline = True

    def describe(self) -> str:
        dm = self.dims
        edp = f", edp {dm.expert_replicas}" if dm.expert_replicas > 1 else ""
        return (f"af_pipe: attention {dm.attention_ranks} ranks, experts {dm.expert_ranks} ranks, "
                f"p = {dm.pipeline_depth} (dp {dm.dp}{self._sharding()}, ep {dm.ep}{edp}){_precision(self.config)}; "
                f"this rank: {self.role}")

    def _sharding(self) -> str:
        if not self.fsdp:
            return ""
        r = self.dims.dp_replicate
        return f", HSDP {r} x {self.dims.dp // r}" if r > 1 else ", FSDP2"

    def forward_backward(self, inputs, labels) -> torch.Tensor | None:
        return self.runtime.step(inputs, labels)

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """Average attention gradients over the group; experts saw every group rank's tokens."""
        for param in self.model.parameters():
            if param.grad is None:  # e.g. experts that received no token this step
                param.grad = torch.zeros_like(param)
        if self.role.pool == "attention":
            if self.dims.dp > 1 and not self.fsdp:
                group = self.dims.my_group(self.rank)
                for param in self.model.parameters():
                    dist.all_reduce(param.grad, group=group)
                    param.grad.div_(self.dims.dp)
        elif self.dims.expert_replicas > 1:  # replicas saw other attention ranks' tokens: sum them
            reduce_expert_grads(self.expert_params, self.dims.my_mesh(self.rank), self.dims.dp)
        else:
            for param in self.expert_params:
                param.grad.to_local().div_(self.dims.dp)

    def mean_over_batch(self, value: float | None) -> float:
        """Average over the data-parallel index of a value held by one attention group
        (pass None on ranks that do not hold it)."""
        return _sum_over_job(value or 0.0, self.world_size) / self.dims.dp

    def save_timeline(self, folder, step: int) -> None:
        """This rank's action trace of the last step, as JSON (scripts/plot_timeline.py)."""
        record = {"rank": self.rank, "pool": self.role.pool, "group": self.role.group, "index": self.role.index,
                  "step": step, "num_layers": self.runtime.num_layers,
                  "events": [list(e) for e in self.runtime.times.trace]}
        with open(f"{folder}/rank{self.rank}.json", "w") as f:
            json.dump(record, f)

    def step_metrics(self, device: torch.device) -> dict[str, float]:
        """Bytes sent per step by all ranks, by edge, and per-pool busy/waiting fractions
        of the last step (collective: call on every rank)."""
        sent = self.runtime.stats.reset()
        kinds = {"dispatch_bytes": DISPATCH, "combine_bytes": COMBINE, "residual_bytes": RESIDUAL,
                 "dispatch_grad_bytes": DISPATCH_GRAD, "combine_grad_bytes": COMBINE_GRAD,
                 "residual_grad_bytes": RESIDUAL_GRAD}
        _, busy, waiting = self.runtime.times.fractions()
        is_attention = float(self.role.pool == "attention")
        values = [float(sent.get(k, 0)) for k in kinds.values()]
        values += [busy * is_attention, busy * (1 - is_attention), waiting, peak_memory_gib(device) * is_attention,
                   peak_memory_gib(device) * (1 - is_attention)]
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t[:-2])
        dist.all_reduce(t[-2:], op=dist.ReduceOp.MAX)
        out = dict(zip(kinds, t[:6].tolist()))
        dm = self.dims
        out.update(busy_fraction_attention=t[6].item() / dm.attention_ranks,
                   busy_fraction_expert=t[7].item() / dm.expert_ranks,
                   exposed_comm_fraction=t[8].item() / self.world_size,
                   memory_gib_attention=t[9].item(), memory_gib_expert=t[10].item())
        return out


def build_layout(config: JobConfig, spec: ModelSpec, args: MoETransformerArgs, rank: int, world_size: int,
                 device: torch.device):
    mode = config.effective_mode(world_size)
    if mode != config.disagmoe.mode:
        logger.warning("disagmoe.mode = 'af_pipe' needs at least 2 ranks (one per pool); NGPU = 1 runs "
                       "the single-process reference on the same data instead")
    if mode == "af_pipe":
        cls = DisaggregatedLayout
    elif config.parallelism.pipeline_parallel_degree > 1:
        cls = PipelinedColocatedLayout
    else:
        cls = ColocatedLayout
    return cls(config, spec, args, rank, world_size, device)

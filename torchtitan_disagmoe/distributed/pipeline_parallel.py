"""Colocated pipeline parallelism on torch.distributed.pipelining (the EP + PP baseline).

The model's layers are cut into ``pp x stages_per_rank`` stages of equal layer count; the
embedding goes with the first stage, the final norm and output head with the last. Stage
s lives on pipeline rank ``s % pp`` for looped schedules (1F1B, Interleaved1F1B) and on
``min(s, 2pp - 1 - s)`` for the V of DualPipeV:

    4 layers, pp 2, Interleaved1F1B (2 stages per rank, 1 layer each):
        pipeline rank 0: stage 0 (embedding, layer 0), stage 2 (layer 2)
        pipeline rank 1: stage 1 (layer 1),            stage 3 (layer 3, norm, output)

Each stage is a ``PipelineStageModule`` that *shares* its submodules with the whole model;
the whole model is pruned to this rank's stages, so ``model.named_parameters()`` gives
the full model's names (DCP checkpoints move between layouts) while the schedule runs
the stage modules. FSDP2 and expert parallelism act over the data-parallel ranks of one
pipeline rank (``ParallelDims``): those ranks run the same schedule in the same order, so
their all-to-alls and all-gathers match up.

Shapes are given to ``PipelineStage`` up front (static metadata): otherwise the library
infers them with a real forward and backward of the first micro-batch, which would count
routed tokens and balance losses once more than the single-process reference does.

Gradient scaling: ``scale_grads=False`` and a loss of ``cross_entropy / M`` per
micro-batch, so gradients sum to those of the mean over the local batch; the MoE balance
loss gets the same 1/M through ``MoE.aux_loss_scale``.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                          ScheduleInterleaved1F1B)

from .parallel_dims import ParallelDims

SCHEDULE_CLASSES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B,
                    "DualPipeV": ScheduleDualPipeV}
V_SCHEDULES = ("DualPipeV",)


def stage_layer_ranges(n_layers: int, num_stages: int) -> list[range]:
    """Consecutive layer ids of each stage (equal counts; the config check guarantees it)."""
    per_stage = n_layers // num_stages
    assert per_stage * num_stages == n_layers, (n_layers, num_stages)
    return [range(s * per_stage, (s + 1) * per_stage) for s in range(num_stages)]


def stage_ids_for_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Stages held by pipeline rank ``pp_rank``, in increasing order.

    Looped: rank r holds r, r + pp, r + 2pp, ...; V (2 stages per rank): r and 2pp - 1 - r.
    """
    if schedule in V_SCHEDULES:
        assert stages_per_rank == 2, stages_per_rank
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + s * pp for s in range(stages_per_rank)]


class PipelineStageModule(nn.Module):
    """One pipeline stage: optional embedding, some blocks, optional norm and head.

    Its submodules are the whole model's own (shared, not copied), registered under the
    same attribute names, so parameter names inside a stage are the full model's too.
    """

    def __init__(self, model: nn.Module, layer_ids: range, is_first: bool, is_last: bool):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if is_last else None
        self.output = model.output if is_last else None
        self._owner = [model]  # the RoPE table lives there; a list keeps it unregistered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (b, S) on the first stage, else hidden states (b, S, D); returns
        hidden states, or logits (b, S, vocab) on the last stage."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        rope_cache = self._owner[0].rope_cache
        for layer in self.layers.values():
            h = layer(h, rope_cache)
        if self.output is not None:
            h = self.output(self.norm(h))
        return h


def split_into_stages(model: nn.Module, stage_ids: list[int], num_stages: int) -> list[PipelineStageModule]:
    """Build this rank's stage modules and prune ``model`` to them, in place (meta device).

    Returns:
        The stage modules, in the order of ``stage_ids``.
    """
    ranges = stage_layer_ranges(len(model.layers), num_stages)
    stages = [PipelineStageModule(model, ranges[s], s == 0, s == num_stages - 1) for s in stage_ids]
    owned = {i for s in stage_ids for i in ranges[s]}
    for key in list(model.layers.keys()):
        if int(key) not in owned:
            del model.layers[key]
    if 0 not in stage_ids:
        model.tok_embeddings = None
    if num_stages - 1 not in stage_ids:
        model.norm = None
        model.output = None
    return stages


def build_pipeline_schedule(stage_modules: list[PipelineStageModule], stage_ids: list[int], num_stages: int,
                            dims: ParallelDims, schedule: str, microbatches: int, microbatch_shape: tuple[int, int],
                            dim: int, vocab_size: int, device: torch.device):
    """Wrap the (parallelized, materialised) stage modules in ``PipelineStage`` objects and
    build the schedule.

    Args:
        microbatch_shape: (sequences, seq_len) of one micro-batch.

    Returns:
        The schedule; ``schedule.step`` runs forward and backward of all micro-batches.
    """
    assert dims.pp_mesh is not None
    group = dims.pp_mesh.get_group()
    b, s = microbatch_shape
    # Metadata only; requires_grad tells the stage that gradients flow back through it.
    hidden = torch.empty(b, s, dim, device="meta", requires_grad=True)
    stages = []
    for module, stage_id in zip(stage_modules, stage_ids):
        first, last = stage_id == 0, stage_id == num_stages - 1
        inputs = torch.empty(b, s, dtype=torch.long, device="meta") if first else hidden
        outputs = torch.empty(b, s, vocab_size, device="meta", requires_grad=True) if last else hidden
        stages.append(PipelineStage(module, stage_id, num_stages, device, input_args=inputs, output_args=outputs,
                                    group=group))
    loss_fn = microbatch_loss(microbatches)
    cls = SCHEDULE_CLASSES[schedule]
    if cls is Schedule1F1B:
        return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)


def microbatch_loss(microbatches: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross entropy of one micro-batch, over ``microbatches``: the sum over micro-batches
    is the mean over the local batch (all micro-batches have the same token count)."""

    def loss_fn(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten()) / microbatches

    return loss_fn

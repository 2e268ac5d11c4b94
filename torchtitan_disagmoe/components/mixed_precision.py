"""bf16 mixed precision with fp32 master weights, as torchtitan does it.

``training.mixed_precision_param = "bfloat16"`` computes in bf16 while parameters,
gradients and optimizer states stay fp32:

- modules sharded by FSDP2 (colocated blocks, af_pipe attention groups with more than one
  rank) get a ``MixedPrecisionPolicy``: bf16 all-gather and compute, gradients reduced in
  ``mixed_precision_reduce`` (fp32) into the fp32 shards;
- everything else (the single-process run, replicated attention, the expert ranks of
  af_pipe) runs its forward under ``torch.autocast`` (torchtitan's ``maybe_enable_amp``
  does the same for unsharded models). Backward needs no context: autograd replays the
  dtypes the forward recorded, and the casts' backward returns fp32 gradients.
- experts that FSDP2 leaves to expert parallelism take the dtype of their input (or of
  autocast): ``GroupedExperts`` casts its weights, so the cast's gradient arrives in fp32.

The loss is always computed from fp32 logits.
"""

import contextlib

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from torchtitan_disagmoe.config.job_config import Training


def compute_dtype(training: Training) -> torch.dtype:
    return getattr(torch, training.mixed_precision_param)


def fsdp_mp_policy(training: Training) -> MixedPrecisionPolicy:
    """FSDP2's policy; the default (fp32) policy changes nothing."""
    if training.mixed_precision_param == "float32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype(training),
                                reduce_dtype=getattr(torch, training.mixed_precision_reduce))


def autocast_unsharded(training: Training, device_type: str, sharded: bool):
    """The forward context of a rank whose weights FSDP2 does not hold: autocast in bf16
    mode, nothing otherwise (or when FSDP2's policy already casts)."""
    if training.mixed_precision_param == "float32" or sharded:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=compute_dtype(training))

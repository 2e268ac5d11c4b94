"""Expert load balancing applied by the trainer around the optimizer step.

Two mechanisms, selected by ``[moe] load_balance``:
- ``aux_loss``: a sequence-wise balance loss computed inside each MoE layer (see
  ``models/moe.py``); here we only switch it on and set its coefficient.
- ``aux_loss_free`` (arXiv 2408.15664, DeepSeek-V3): after each step, every layer's
  routing bias moves by ``rate * sign(mean_load - load_e)``, so under-used experts get
  picked more. The loads are summed over all data-parallel ranks first, so every rank
  (and every layout) applies the same update as one process seeing the whole batch.
"""

import torch
import torch.distributed as dist

from torchtitan_disagmoe.models.moe import MoE


def configure_load_balance(moes: list[MoE], mode: str, aux_loss_coeff: float) -> None:
    use_aux = mode in ("aux_loss", "both")
    for moe in moes:
        moe.use_expert_bias = mode in ("aux_loss_free", "both")
        moe.aux_loss_coeff = aux_loss_coeff if use_aux else 0.0


@torch.no_grad()
def update_expert_bias(moes: list[MoE], rate: float, enabled: bool, group: dist.ProcessGroup | None,
                       world_size: int) -> torch.Tensor | None:
    """Apply the aux-loss-free bias update and reset the token counters.

    Args:
        group: the ranks that route the same layers for different sequences (None: all).

    Returns:
        The global tokens-per-expert counts, shape (layers, E), or None without MoE layers.
    """
    if not moes:
        return None
    counts_LE = torch.stack([moe.tokens_per_expert for moe in moes])
    if world_size > 1:
        dist.all_reduce(counts_LE, group=group)
    if enabled and rate > 0:
        delta_LE = rate * torch.sign(counts_LE.mean(dim=1, keepdim=True) - counts_LE)
        delta_LE -= delta_LE.mean(dim=1, keepdim=True)  # keep the bias centred
        for moe, delta in zip(moes, delta_LE):
            moe.expert_bias.add_(delta)
    for moe in moes:
        moe.tokens_per_expert.zero_()
    return counts_LE


def load_imbalance(counts_LE: torch.Tensor) -> float:
    """Max over mean expert load, averaged over layers (1.0 is perfect balance)."""
    return (counts_LE.max(dim=1).values / counts_LE.mean(dim=1).clamp(min=1)).mean().item()

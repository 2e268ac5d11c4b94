"""Compute of the disaggregated stages, each its own autograd graph.

A stage's inputs are fresh leaf tensors (what arrived over the network, or a detached
copy of the previous stage's output on the same rank) and its outputs are what leaves
the stage. Backward of a stage takes the gradients of its outputs (as they come back
over the network) and leaves the gradients of its inputs in ``.grad``, ready to be sent
on. This is what lets a schedule run stages of different micro-batches in any order.

Shape legend: B sequences, S tokens per sequence, T = B*S, D model dim, K top-k,
n rows sent to one expert rank (tokens with at least one expert there), M rows an expert
rank received from all attention ranks, N routed copies on an expert rank, e experts
per expert rank.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_disagmoe.models.moe import GroupedExperts, Routing, count_tokens_per_expert


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy-free view of ``t`` that collects its own gradient."""
    return t.detach().requires_grad_()


@dataclass
class DispatchRows:
    """What one attention rank sends to one expert rank for one layer (M2N dispatch).

    Each token with at least one of its top-k experts on that expert rank appears once,
    whatever the number of its experts there (the once-per-(token, rank) rule).
    """

    x_nD: torch.Tensor
    """Normalised hidden states (part of the attention stage's graph)."""
    weights_nK: torch.Tensor
    """Routing weights, zero for experts elsewhere (graph: their gradient flows back)."""
    local_ids_nK: torch.Tensor
    """Expert index on the receiving rank, -1 for experts elsewhere."""
    token_idx_n: torch.Tensor
    """Position of each row in the sender's (B*S) tokens; carried to the combine."""


def split_by_expert_rank(x_TD: torch.Tensor, routing: Routing, ep: int, experts_per_rank: int) -> list[DispatchRows]:
    """Local part of M2N dispatch: the rows for each of the ``ep`` expert ranks."""
    owner_TK = routing.expert_ids_TK // experts_per_rank
    rows = []
    for j in range(ep):
        here_TK = owner_TK == j
        token_idx_n = here_TK.any(dim=1).nonzero().squeeze(1)
        here_nK = here_TK[token_idx_n]
        weights_nK = torch.where(here_nK, routing.weights_TK[token_idx_n], 0.0)
        local_ids_nK = torch.where(here_nK, routing.expert_ids_TK[token_idx_n] - j * experts_per_rank, -1)
        rows.append(DispatchRows(x_TD[token_idx_n], weights_nK, local_ids_nK, token_idx_n))
    return rows


def run_local_experts(experts: GroupedExperts, x_MD: torch.Tensor, weights_MK: torch.Tensor,
                      local_ids_MK: torch.Tensor) -> torch.Tensor:
    """Expert side of a layer: every (row, slot) with a local expert becomes one copy,
    copies are grouped by expert for the grouped GEMM, then weighted and summed per row.

    Returns:
        out_MD: one vector per received row, sum_k w_k * expert_k(x) over local experts.
    """
    num_rows, top_k = local_ids_MK.shape
    flat_ids = local_ids_MK.reshape(-1)
    valid_N = (flat_ids >= 0).nonzero().squeeze(1)
    ids_N = flat_ids[valid_N]
    slot_N = valid_N[torch.argsort(ids_N, stable=True)]  # (row, k) slots grouped by expert
    tokens_per_expert_e = count_tokens_per_expert(ids_N, experts.local_weights()[0].shape[0])
    y_ND = experts(x_MD[slot_N // top_k], tokens_per_expert_e)
    y_ND = y_ND * weights_MK.reshape(-1)[slot_N].unsqueeze(1).to(y_ND.dtype)
    # Scatter into (row, slot) then sum over slots: deterministic, no atomics.
    out = y_ND.new_zeros(num_rows * top_k, y_ND.shape[1]).index_copy(0, slot_N, y_ND)
    return out.view(num_rows, top_k, x_MD.shape[1]).sum(dim=1)


@dataclass
class StageRecord:
    """Inputs and outputs of one stage for one micro-batch, kept for its backward."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def backward(self, output_grads: list[torch.Tensor | None]) -> None:
        pairs = [(o, g) for o, g in zip(self.outputs, output_grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def attention_layer_forward(block: nn.Module, x_BSD: torch.Tensor, rope_cache: torch.Tensor,
                            ep: int, experts_per_rank: int):
    """Attention-side work of one layer.

    Returns:
        (h_BSD, rows): the residual stream leaving the layer (with shared experts, or the
        whole output of a dense layer) and, for MoE layers, the dispatch rows per expert
        rank (None for dense layers).
    """
    h_BSD = block.attention_part(x_BSD, rope_cache)
    if not block.moe_enabled:
        return block.ffn_part(h_BSD), None
    batch_size, _, dim = h_BSD.shape
    moe = block.moe
    xn_TD = block.ffn_norm(h_BSD).reshape(-1, dim)
    routing = moe.route(xn_TD)
    if moe.shared_experts is not None:
        h_BSD = h_BSD + moe.shared_experts(xn_TD).view_as(h_BSD)
    h_BSD = moe.attach_aux_loss(h_BSD, routing, batch_size)
    return h_BSD, split_by_expert_rank(xn_TD, routing, ep, experts_per_rank)


def head_forward(model: nn.Module, x_BSD: torch.Tensor, labels_BS: torch.Tensor, loss_scale: float):
    """Final norm, output head and the mean cross entropy over this rank's tokens."""
    logits = model.output(model.norm(x_BSD))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels_BS.flatten())
    return loss * loss_scale, loss.detach()

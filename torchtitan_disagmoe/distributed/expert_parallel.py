"""Colocated expert parallelism: experts sharded over ranks, all-to-all dispatch/combine.

Shape legend as in ``models/moe.py``; R: ranks of the expert-parallel group, e: experts
per rank (E = R*e).

Dispatch, in phases so that a schedule can overlap the communication:
    1. local permute: sort this rank's (token, k) copies by global expert id
    2. counts exchange: all-to-all of the per-expert counts (R x e ints), so every rank
       knows how many tokens it receives from whom (token counts vary every step)
    3. token exchange: all-to-all of the copies with uneven splits (autograd-aware)
    4. local regroup: received blocks arrive (source rank, local expert)-major; experts
       need them local-expert-major
Combine runs the same steps in reverse, then weights and sums per token locally.

Written for us rather than taken from torchtitan: its ``ExpertParallel`` goes through
functional collectives and a triton/CUDA permute kernel, and counts tokens with integer
``histc``, which CPU lacks. This runs on gloo and NCCL alike.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from torchtitan_disagmoe.models.moe import MoE, Routing, sort_by_expert, unsort_and_combine


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def block_regroup_index(counts_RE: torch.Tensor) -> torch.Tensor:
    """Index that reorders rows stored in (r, e)-major blocks into (e, r)-major blocks.

    Args:
        counts_RE: block sizes, shape (R, e); rows of block (r, j) are contiguous.

    Returns:
        index_N such that ``x[index_N]`` lists expert 0's rows from every source rank,
        then expert 1's, ...
    """
    starts_RE = torch.cumsum(counts_RE.flatten(), 0).view_as(counts_RE) - counts_RE
    lens_ER = counts_RE.T.flatten()
    starts_ER = starts_RE.T.flatten()
    # Each output row = start of its block + its position inside the block.
    out_block_starts = torch.cumsum(lens_ER, 0) - lens_ER
    total = int(lens_ER.sum())
    shift = torch.repeat_interleave(starts_ER - out_block_starts, lens_ER)
    return torch.arange(total, device=counts_RE.device) + shift


class AllToAllDispatchState(NamedTuple):
    order_N: torch.Tensor
    weights_TK: torch.Tensor
    regroup_index_M: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllTokenDispatcher:
    """Token dispatcher for experts sharded over an expert-parallel process group."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep
        self.bytes_sent = {"dispatch": 0, "combine": 0}  # to other ranks, forward only

    def _count(self, kind: str, splits: list[int], row: torch.Tensor) -> None:
        rows = sum(splits) - splits[self.ep_rank]
        self.bytes_sent[kind] += rows * row.shape[-1] * row.element_size()

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        x_ND, counts_E, order_N = sort_by_expert(x_TD, routing, self.num_experts)
        counts_Re = counts_E.view(self.ep, self.local_experts)
        recv_counts_Re = torch.empty_like(counts_Re)
        dist.all_to_all_single(recv_counts_Re, counts_Re, group=self.group)
        send_splits = counts_Re.sum(1).tolist()
        recv_splits = recv_counts_Re.sum(1).tolist()
        x_MD = all_to_all(x_ND, recv_splits, send_splits, self.group)
        self._count("dispatch", send_splits, x_ND)
        regroup_M = block_regroup_index(recv_counts_Re)
        state = AllToAllDispatchState(order_N, routing.weights_TK, regroup_M, send_splits, recv_splits)
        return x_MD[regroup_M], recv_counts_Re.sum(0), state

    def combine(self, y_MD: torch.Tensor, state: AllToAllDispatchState) -> torch.Tensor:
        inverse_M = torch.empty_like(state.regroup_index_M)
        inverse_M[state.regroup_index_M] = torch.arange(len(inverse_M), device=inverse_M.device)
        y_ND = all_to_all(y_MD[inverse_M], state.send_splits, state.recv_splits, self.group)
        self._count("combine", state.recv_splits, y_MD)
        return unsort_and_combine(y_ND, state.order_N, state.weights_TK)


def shard_experts(experts: nn.Module, expert_mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace ``experts.w1/w2/w3`` (E, ...) by this rank's (E/ep, ...) block, in place.

    Works on a meta-device model before materialisation. The block is wrapped as a
    DTensor, Shard(0) over the mesh's ``ep`` dim (and Replicate over ``edp`` if the mesh has
    it), so that DCP saves and loads the whole expert tensor under the usual FQN.
    """
    ep_mesh = expert_mesh["ep"] if expert_mesh.ndim > 1 else expert_mesh
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    placements = [Replicate()] * (expert_mesh.ndim - 1) + [Shard(0)]
    params = []
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        local = full.detach().chunk(ep_size, dim=0)[ep_rank].clone()
        dparam = nn.Parameter(DTensor.from_local(local, expert_mesh, placements, run_check=False))
        setattr(experts, name, dparam)
        params.append(dparam)
    return params


def apply_expert_parallel(model: nn.Module, expert_mesh: DeviceMesh, overlap_chunks: int = 0) -> list[nn.Parameter]:
    """Colocated EP: shard every MoE layer's experts over ``ep`` and swap in the
    all-to-all dispatcher (in place, on a meta-device model).

    Args:
        overlap_chunks: > 0: the dispatcher that overlaps all-to-all with compute over
            this many token chunks (``ep_overlap.py``); 0: the plain one.

    Returns:
        The expert parameters (their gradients need ``reduce_expert_grads``).
    """
    from .ep_overlap import OverlappedAllToAllDispatcher  # it subclasses the dispatcher above

    expert_params = []
    for module in model.modules():
        if isinstance(module, MoE):
            expert_params += shard_experts(module.experts, expert_mesh)
            group, num_experts = expert_mesh.get_group("ep"), module.args.num_experts
            module.dispatcher = (OverlappedAllToAllDispatcher(group, num_experts, overlap_chunks) if overlap_chunks
                                 else AllToAllTokenDispatcher(group, num_experts))
    return expert_params


@torch.no_grad()
def reduce_expert_grads(expert_params: list[nn.Parameter], expert_mesh: DeviceMesh, dp_degree: int) -> None:
    """Turn expert gradients into the gradient of the mean loss over all dp ranks.

    After backward, an expert's gradient on rank r sums the contributions of every token
    routed to it from its expert-parallel group. Replicas over ``edp`` saw other ranks'
    tokens, so they are summed too; dividing by the data-parallel degree matches FSDP's
    averaging of the dense gradients.
    """
    edp_group = expert_mesh.get_group("edp") if expert_mesh["edp"].size() > 1 else None
    for param in expert_params:
        if param.grad is None:
            continue
        grad = param.grad.to_local()
        if edp_group is not None:
            dist.all_reduce(grad, group=edp_group)
        grad.div_(dp_degree)

"""Intra-layer overlap for colocated expert parallelism (the ``ep_overlap`` baseline).

``parallelism.expert_parallel_overlap = true`` swaps in ``OverlappedAllToAllDispatcher``:
each MoE layer splits its tokens into C chunks (``expert_parallel_overlap_chunks``) so
that communication of one chunk hides behind computation of another. Shape legend as in
``models/moe.py`` and ``expert_parallel.py``; C: chunks.

Forward of one layer (all-to-alls are ``async_op=True``; gloo and NCCL run them in the
background, in the order they were issued, the same order on every rank):
    1. local permute of every chunk; ONE counts all-to-all for all chunks (C x R x e ints)
    2. post the token all-to-alls (dispatch) of all chunks
    3. for c in chunks: wait dispatch(c) -> experts(c) -> post combine(c)
       (dispatch of c+1.. and combine of ..c-1 are in flight while chunk c computes)
    4. shared experts on the un-dispatched tokens, while the combines are in flight
    5. wait the combines, weight and sum per token, concatenate the chunks

Backward mirrors it without any explicit schedule: each all-to-all is two autograd nodes,
``_PostAllToAll`` (posts the forward op) and ``_WaitAllToAll`` (waits for it). In
backward, ``_WaitAllToAll`` posts the gradient's all-to-all and returns at once; the
matching ``_PostAllToAll`` waits for it. The autograd engine runs ready nodes newest
first, so between those two it runs the backward of everything computed later in the
forward: the shared experts overlap the combines' gradients, and the experts of chunk c
overlap the dispatch gradient of chunk c+1.

Same numbers as the plain dispatcher: routing is computed once for all tokens, every
token meets the same experts and weights; only the grouping of rows into matmuls changes
(fp32 rounding of sums over tokens, held by the parity tests).
"""

import torch
import torch.distributed as dist
from torch import nn

from torchtitan_disagmoe.models.moe import Routing, sort_by_expert, unsort_and_combine

from .expert_parallel import AllToAllTokenDispatcher, block_regroup_index


class _InFlight:
    """One all-to-all and its gradient's all-to-all, shared by the post and wait nodes.
    Keeps the buffers alive while the operation runs."""

    __slots__ = ("work", "send", "grad_work", "grad_send", "grad_out")

    def __init__(self):
        self.work = self.send = self.grad_work = self.grad_send = self.grad_out = None


class _PostAllToAll(torch.autograd.Function):
    """Posts ``all_to_all_single(x)``; the output is valid only after ``_WaitAllToAll``."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, op: _InFlight):
        ctx.op = op
        op.send = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        op.work = dist.all_to_all_single(out, op.send, out_splits, in_splits, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, _unused):
        op = ctx.op
        op.grad_work.wait()  # posted by _WaitAllToAll.backward
        grad, op.grad_out, op.grad_send, op.grad_work = op.grad_out, None, None, None
        return grad, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Waits for the posted all-to-all; its backward posts the gradient's all-to-all."""

    @staticmethod
    def forward(ctx, out, out_splits: list[int], in_splits: list[int], group, op: _InFlight):
        op.work.wait()
        op.work = op.send = None
        ctx.op, ctx.out_splits, ctx.in_splits, ctx.group = op, out_splits, in_splits, group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        op = ctx.op
        op.grad_send = grad.contiguous()
        op.grad_out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        op.grad_work = dist.all_to_all_single(op.grad_out, op.grad_send, ctx.in_splits, ctx.out_splits,
                                              group=ctx.group, async_op=True)
        # Placeholder: _PostAllToAll.backward returns the real gradient once it arrives.
        return grad, None, None, None, None


def post_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple:
    """Start an autograd-aware all-to-all; returns a token for ``wait_all_to_all``."""
    op = _InFlight()
    return _PostAllToAll.apply(x, out_splits, in_splits, group, op), out_splits, in_splits, group, op


def wait_all_to_all(posted: tuple) -> torch.Tensor:
    return _WaitAllToAll.apply(*posted)


def _chunk_routing(routing: Routing, start: int, end: int) -> Routing:
    return Routing(routing.weights_TK[start:end], routing.expert_ids_TK[start:end], routing.probs_TE[start:end])


class OverlappedAllToAllDispatcher(AllToAllTokenDispatcher):
    """All-to-all dispatcher that runs dispatch, experts and combine itself, chunk by
    chunk, overlapping communication with computation (module docstring)."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, chunks: int):
        super().__init__(group, num_experts)
        self.chunks = chunks

    def dispatch_compute_combine(self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module,
                                 shared_experts: nn.Module | None) -> torch.Tensor:
        """Routed experts (+ shared experts) of ``x_TD``; same result as dispatch ->
        experts -> combine (+ shared) of the plain dispatcher.

        Args:
            x_TD: this rank's tokens; routing: their routing (all T tokens).

        Returns:
            out_TD: weighted sum of each token's experts, plus its shared experts.
        """
        base, extra = divmod(x_TD.shape[0], self.chunks)
        sizes = [base + (c < extra) for c in range(self.chunks)]
        bounds = [sum(sizes[:c]) for c in range(self.chunks + 1)]  # chunk c: tokens bounds[c]:bounds[c+1]
        # 1. Local permute per chunk, then one counts exchange for all chunks.
        sorted_chunks = [sort_by_expert(x_TD[a:b], _chunk_routing(routing, a, b), self.num_experts)
                         for a, b in zip(bounds[:-1], bounds[1:])]
        counts_RCe = torch.stack([counts_E for _, counts_E, _ in sorted_chunks]).view(
            self.chunks, self.ep, self.local_experts).transpose(0, 1).contiguous()
        recv_RCe = torch.empty_like(counts_RCe)
        dist.all_to_all_single(recv_RCe, counts_RCe, group=self.group)
        send_CR, recv_CR = counts_RCe.sum(2).T.tolist(), recv_RCe.sum(2).T.tolist()
        # 2. Post every chunk's dispatch; they run in the background, in order.
        dispatched = []
        for (x_ND, _, _), send, recv in zip(sorted_chunks, send_CR, recv_CR):
            dispatched.append(post_all_to_all(x_ND, recv, send, self.group))
            self._count("dispatch", send, x_ND)
        # 3. Experts of chunk c while later dispatches and earlier combines are in flight.
        combines = []
        for c, posted in enumerate(dispatched):
            recv_counts_Re = recv_RCe[:, c]
            regroup_M = block_regroup_index(recv_counts_Re)
            y_MD = experts(wait_all_to_all(posted)[regroup_M], recv_counts_Re.sum(0))
            inverse_M = torch.empty_like(regroup_M)
            inverse_M[regroup_M] = torch.arange(len(regroup_M), device=regroup_M.device)
            combines.append(post_all_to_all(y_MD[inverse_M], send_CR[c], recv_CR[c], self.group))
            self._count("combine", recv_CR[c], y_MD)
        # 4. Shared experts while the combines are in flight.
        shared_TD = shared_experts(x_TD) if shared_experts is not None else None
        # 5. Wait, weight and sum per token.
        outs = [unsort_and_combine(wait_all_to_all(posted), order_N, routing.weights_TK[a:b])
                for posted, (_, _, order_N), a, b in zip(combines, sorted_chunks, bounds[:-1], bounds[1:])]
        out_TD = torch.cat(outs, dim=0)
        return out_TD if shared_TD is None else out_TD + shared_TD

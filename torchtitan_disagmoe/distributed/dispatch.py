"""Point-to-point transfers of the disaggregated pipeline: M2N dispatch, N2M combine,
the residual hand-off between attention groups, and their gradients.

Every transfer moves *rows* (one per token, or per (token, expert rank)) whose number
changes every step, so it runs in two phases: first the row counts (one int64 per peer),
then the payloads, each phase one ``batch_isend_irecv`` (async on gloo and NCCL). Where
the receiver already knows the counts (every backward transfer, and fixed-size residual
hand-offs) the count phase is skipped. Empty payloads are never sent.

Why our own instead of torch.distributed.pipelining's P2P: the library pre-allocates
receive buffers from the first micro-batch's shapes, and its stages talk only to the
next and previous stage; dispatch is many-to-many with variable sizes (FINDINGS.md).

Tags keep concurrent transfers between the same two ranks apart on gloo (NCCL ignores
them and relies on issue order, which is the same on both sides by construction).
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Transfer kinds, part of the tag.
DISPATCH, COMBINE, RESIDUAL, DISPATCH_GRAD, COMBINE_GRAD, RESIDUAL_GRAD = range(6)


def make_tag(layer_id: int, kind: int, microbatch: int = 0) -> int:
    """Tag of a transfer; the tensors of one message use tag + 0..3."""
    return ((microbatch * 4096 + layer_id) * 8 + kind) * 4


@dataclass
class CommStats:
    """Bytes this rank sent, by transfer kind (payloads and counts)."""

    sent: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: int, tensors: list[torch.Tensor]) -> None:
        self.sent[kind] += sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> dict[int, int]:
        sent, self.sent = dict(self.sent), defaultdict(int)
        return sent


def _run(ops: list[dist.P2POp]) -> None:
    for work in _post(ops):
        work.wait()


def _post(ops: list[dist.P2POp]) -> list[dist.Work]:
    return dist.batch_isend_irecv(ops) if ops else []


@dataclass
class Pending:
    """Posted receives (or sends) and the tensors they fill (or read)."""

    works: list
    tensors: dict[int, list[torch.Tensor]]

    def wait(self) -> dict[int, list[torch.Tensor]]:
        for work in self.works:
            work.wait()
        self.works = []
        return self.tensors


def post_sends(send: dict[int, list[torch.Tensor]], tag: int, device: torch.device, with_counts: bool,
               stats: CommStats | None = None, kind: int = 0) -> Pending:
    """Post (counts and) payloads to peers without waiting; keep the result until done."""
    ops, keep = [], {}
    for peer, tensors in send.items():
        tensors = [t.contiguous() for t in tensors]
        keep[peer] = tensors
        if with_counts:
            count = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
            keep[peer] = [count] + tensors
            ops.append(dist.P2POp(dist.isend, count, peer, tag=tag + 3))
            if stats is not None:
                stats.add(kind, [count])
        for i, t in enumerate(tensors):
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t, peer, tag=tag + i))
        if stats is not None:
            stats.add(kind, tensors)
    return Pending(_post(ops), keep)


def post_recvs_known(recv: dict[int, list[torch.Tensor]], tag: int) -> Pending:
    """Post receives into pre-allocated tensors (sizes known) without waiting."""
    ops = [dist.P2POp(dist.irecv, t, peer, tag=tag + i)
           for peer, tensors in recv.items() for i, t in enumerate(tensors) if t.numel()]
    return Pending(_post(ops), recv)


def post_recvs_rows(recv_from: list[int], layout: list[tuple[tuple[int, ...], torch.dtype]], tag: int,
                    device: torch.device) -> Pending:
    """Receive row counts (blocking: tiny, and the sender posted them with its payload),
    then post the payload receives without waiting.

    Waiting for the counts here keeps, for every peer, receives in the order of its sends,
    which NCCL needs (it matches point-to-point messages by order, not by tag).
    """
    counts = {peer: torch.empty(1, dtype=torch.int64, device=device) for peer in recv_from}
    _run([dist.P2POp(dist.irecv, c, peer, tag=tag + 3) for peer, c in counts.items()])
    tensors = {peer: [torch.empty((int(counts[peer]),) + shape, dtype=dtype, device=device)
                      for shape, dtype in layout] for peer in recv_from}
    return post_recvs_known(tensors, tag)


def exchange_known(send: dict[int, list[torch.Tensor]], recv: dict[int, list[torch.Tensor]],
                   tag: int, stats: CommStats | None = None, kind: int = 0) -> None:
    """Send tensors to peers and receive into pre-allocated tensors (sizes known)."""
    ops = []
    for peer, tensors in send.items():
        for i, t in enumerate(tensors):
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t.contiguous(), peer, tag=tag + i))
        if stats is not None:
            stats.add(kind, tensors)
    for peer, tensors in recv.items():
        for i, t in enumerate(tensors):
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, peer, tag=tag + i))
    _run(ops)


def exchange_rows(send: dict[int, list[torch.Tensor]], recv_from: list[int],
                  recv_layout: list[tuple[tuple[int, ...], torch.dtype]], tag: int, device: torch.device,
                  stats: CommStats | None = None, kind: int = 0) -> dict[int, list[torch.Tensor]]:
    """Counts first, then row payloads.

    Args:
        send: peer -> tensors that share their first dim (the row count).
        recv_from: peers that send to this rank.
        recv_layout: (trailing shape, dtype) of each tensor a peer sends.

    Returns:
        peer -> received tensors, in ``recv_layout`` order.
    """
    counts_out = {peer: torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
                  for peer, tensors in send.items()}
    counts_in = {peer: torch.empty(1, dtype=torch.int64, device=device) for peer in recv_from}
    ops = [dist.P2POp(dist.isend, c, peer, tag=tag) for peer, c in counts_out.items()]
    ops += [dist.P2POp(dist.irecv, c, peer, tag=tag) for peer, c in counts_in.items()]
    _run(ops)
    if stats is not None:
        stats.add(kind, list(counts_out.values()))
    received = {peer: [torch.empty((int(counts_in[peer]),) + shape, dtype=dtype, device=device)
                       for shape, dtype in recv_layout] for peer in recv_from}
    exchange_known(send, received, tag, stats, kind)
    return received

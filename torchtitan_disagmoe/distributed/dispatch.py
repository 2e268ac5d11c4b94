"""Point-to-point transfers of the disaggregated pipeline: M2N dispatch, N2M combine,
the residual hand-off between attention groups, and their gradients.

Every transfer moves *rows* (one per token, or per (token, expert rank)) whose number
changes every step. The sender posts the row count (one int64 per peer) and the payloads
together, without waiting. How the receiver takes them depends on the backend
(``RowRecv``):

- gloo completes a receive whose buffer is larger than the message (the data fill its
  start), so the receiver posts the count and payload receives at once, the payload into
  buffers of the most rows the peer can send (one per token of the micro-batch: the
  once-per-(token, rank) rule), and slices them to the count. One message, no round trip.
- NCCL needs the receive's size to equal the send's: the receiver posts the count
  receive, then the payload receives once the count is in. The payload then moves only
  after that second post, which the receiver makes between two of its actions.

Everything goes through async ``batch_isend_irecv`` and is waited for only when the data
is needed. Where the receiver already knows the counts (every backward transfer, and
fixed-size residual hand-offs) there is no count. Empty row payloads are sent and
received on gloo (the bounded receive waits for them), never on NCCL.

Why our own instead of torch.distributed.pipelining's P2P: the library pre-allocates
receive buffers from the first micro-batch's shapes, and its stages talk only to the
next and previous stage; dispatch is many-to-many with variable sizes (FINDINGS.md).

Tags keep concurrent transfers between the same two ranks apart on gloo. NCCL ignores
tags and matches messages by order: the schedule validator checks that every pair of
ranks receives in the order it sends, and the runtime posts payload receives per peer
in that order.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

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


def _post(ops: list[dist.P2POp]) -> list[dist.Work]:
    return dist.batch_isend_irecv(ops) if ops else []


@dataclass
class Pending:
    """Posted receives (or sends) and the tensors they fill (or read)."""

    works: list
    tensors: dict[int, list[torch.Tensor]]

    def wait(self, timeout: timedelta | None = None) -> dict[int, list[torch.Tensor]]:
        """Block until done; raises if a peer fails or ``timeout`` passes (then the
        connection is unusable: the job must stop)."""
        for work in self.works:
            work.wait(timeout) if timeout is not None else work.wait()
        self.works = []
        return self.tensors


def receives_into_larger_buffers() -> bool:
    """Whether a receive may be posted larger than its message (gloo: the data fill the
    buffer's start; NCCL: sizes must be equal)."""
    return dist.get_backend() == "gloo"


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
        # A bounded receive (with counts, gloo) waits for every payload, even an empty one.
        send_empty = with_counts and receives_into_larger_buffers()
        for i, t in enumerate(tensors):
            if t.numel() or send_empty:
                ops.append(dist.P2POp(dist.isend, t, peer, tag=tag + i))
        if stats is not None:
            stats.add(kind, tensors)
    return Pending(_post(ops), keep)


def post_recvs_known(recv: dict[int, list[torch.Tensor]], tag: int, empty_too: bool = False) -> Pending:
    """Post receives into pre-allocated tensors (sizes known, or bounds) without waiting."""
    ops = [dist.P2POp(dist.irecv, t, peer, tag=tag + i)
           for peer, tensors in recv.items() for i, t in enumerate(tensors) if t.numel() or empty_too]
    return Pending(_post(ops), recv)


class RowRecv:
    """Receives of rows whose counts are not known yet.

    With ``max_rows`` (gloo, ``receives_into_larger_buffers``) the counts and the payloads
    are posted at once, the payloads into buffers of ``max_rows`` rows; ``wait`` slices
    them to the counts. Without (NCCL): counts are posted at once, the payload receives as
    soon as the counts are in (``poll``) or when needed (``wait``). Peers send counts and
    payloads together, so nothing here waits for the sender's compute. For NCCL, which
    matches point-to-point messages by order rather than by tag, the runtime never lets
    a later RowRecv from a peer post before an earlier one has posted its payloads
    (``force``).
    """

    def __init__(self, recv_from: list[int], layout: list[tuple[tuple[int, ...], torch.dtype]], tag: int,
                 device: torch.device, max_rows: int | None = None):
        self.layout, self.tag, self.device = layout, tag, device
        self.peers = list(recv_from)
        self.counts = {peer: torch.empty(1, dtype=torch.int64, device=device) for peer in recv_from}
        self.count_works = _post([dist.P2POp(dist.irecv, c, peer, tag=tag + 3) for peer, c in self.counts.items()])
        self.payload: Pending | None = None
        self.bounded = max_rows is not None
        if self.bounded:
            self.payload = post_recvs_known(self._buffers(lambda peer: max_rows), tag, empty_too=True)

    def _buffers(self, rows) -> dict[int, list[torch.Tensor]]:
        return {peer: [torch.empty((rows(peer),) + shape, dtype=dtype, device=self.device)
                       for shape, dtype in self.layout] for peer in self.peers}

    def poll(self) -> bool:
        """Post the payload receives if the counts have arrived; True once posted."""
        if self.payload is None and all(w.is_completed() for w in self.count_works):
            self.force()
        return self.payload is not None

    def force(self, timeout: timedelta | None = None) -> None:
        """Wait for the counts (tiny, already sent) and post the payload receives."""
        if self.payload is not None:
            return
        for work in self.count_works:
            work.wait(timeout) if timeout is not None else work.wait()
        # gloo senders send empty payloads too (``post_sends``): receive them alike
        self.payload = post_recvs_known(self._buffers(lambda peer: int(self.counts[peer])), self.tag,
                                        empty_too=receives_into_larger_buffers())

    def wait(self, timeout: timedelta | None = None) -> dict[int, list[torch.Tensor]]:
        self.force(timeout)
        got = self.payload.wait(timeout)
        if not self.bounded:
            return got
        for work in self.count_works:
            work.wait(timeout) if timeout is not None else work.wait()
        return {peer: [t[:int(self.counts[peer])] for t in ts] for peer, ts in got.items()}

"""The overlapping EP dispatcher really overlaps: while the experts of every chunk but
the last, and the shared experts, compute (forward and backward), at least one all-to-all
is in flight. One gloo rank, so the order of events is the dispatcher's alone.

Numbers are held by test_pipeline_parity.py; this checks the schedule."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from torchtitan_disagmoe.distributed import ep_overlap
from torchtitan_disagmoe.models.moe import MoE, MoEArgs

from .harness import spawn

pytestmark = pytest.mark.slow
CHUNKS = 3


class _RecordingDist:
    """Stands in for ``torch.distributed`` inside ep_overlap: logs posts and waits."""

    def __init__(self, log: list[str]):
        self.log = log

    def all_to_all_single(self, *args, async_op: bool = False, **kwargs):
        if not async_op:
            self.log.append("counts")
            return dist.all_to_all_single(*args, **kwargs)
        self.log.append("post")
        work, log = dist.all_to_all_single(*args, async_op=True, **kwargs), self.log

        class _Work:
            def wait(self):
                log.append("wait")
                return work.wait()

        return _Work()


class _Tag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, log: list[str], label: str):
        ctx.log, ctx.label = log, label
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(f"bwd {ctx.label}")  # the backward of what produced y starts now
        return grad, None, None


class _Tagged(nn.Module):
    def __init__(self, inner: nn.Module, log: list[str], name: str):
        super().__init__()
        self.inner, self.log, self.name, self.calls = inner, log, name, 0

    def forward(self, *args):
        label = f"{self.name}{self.calls}" if self.name == "experts" else self.name
        self.calls += 1
        self.log.append(label)
        return _Tag.apply(self.inner(*args), self.log, label)


def _record_one_layer() -> list[str]:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    log: list[str] = []
    moe = MoE(MoEArgs(num_experts=4, num_shared_experts=1, top_k=2), dim=16, hidden_dim=32)
    for param in moe.parameters():
        nn.init.normal_(param, std=0.1)
    moe.dispatcher = ep_overlap.OverlappedAllToAllDispatcher(dist.group.WORLD, 4, CHUNKS)
    moe.experts = _Tagged(moe.experts, log, "experts")
    moe.shared_experts = _Tagged(moe.shared_experts, log, "shared")
    ep_overlap.dist = _RecordingDist(log)
    out = moe(torch.randn(2, 12, 16, requires_grad=True))
    log.append("backward")
    out.square().sum().backward()
    return log


def _in_flight_at(log: list[str], event: str) -> int:
    before = log[:log.index(event)]
    return before.count("post") - before.count("wait")


def test_all_to_all_in_flight_during_expert_and_shared_compute():
    log = spawn(1, _record_one_layer)
    assert log.count("counts") == 1  # one counts exchange for all chunks
    assert log.count("post") == log.count("wait") == 4 * CHUNKS  # dispatch, combine and their gradients
    for c in range(CHUNKS - 1):
        assert _in_flight_at(log, f"experts{c}") >= 1, log        # forward: dispatch of c + 1 in flight
        assert _in_flight_at(log, f"bwd experts{c}") >= 1, log    # backward: dispatch grad of c + 1
    assert _in_flight_at(log, "shared") == CHUNKS, log            # every combine in flight
    assert _in_flight_at(log, "bwd shared") >= 1, log             # combine gradients in flight

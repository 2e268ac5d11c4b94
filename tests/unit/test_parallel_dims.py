"""Unit tests for ParallelDims rank arithmetic (no process group needed)."""

from __future__ import annotations

import pytest

from torchtitan_disagmoe.distributed.parallel_dims import ParallelDims


def test_single_process():
    p = ParallelDims(world_size=1)
    assert (p.dp, p.edp, p.ep) == (1, 1, 1)
    assert not p.distributed and not p.fsdp_enabled and not p.ep_enabled
    assert p.expert_range(0, 8) == range(0, 8)
    p.build_meshes("cpu")  # no-op without ranks
    assert p.dp_mesh is None and p.expert_mesh is None


def test_world4_ep2():
    """Mesh (edp, ep) = [[0, 1], [2, 3]]: rank 2 holds the same experts as rank 0."""
    p = ParallelDims(world_size=4, ep=2)
    assert (p.dp, p.edp) == (4, 2)
    assert p.distributed and p.fsdp_enabled and p.ep_enabled
    assert [p.ep_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [p.edp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [p.expert_range(r, 8) for r in range(4)] == [range(0, 4), range(4, 8), range(0, 4), range(4, 8)]


def test_world8_ep4():
    p = ParallelDims(world_size=8, ep=4)
    assert (p.dp, p.edp) == (8, 2)
    assert [p.ep_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [p.edp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    ranges = [p.expert_range(r, 128) for r in range(8)]
    assert ranges[:4] == [range(0, 32), range(32, 64), range(64, 96), range(96, 128)]
    assert ranges[4:] == ranges[:4]
    # Each expert is held by exactly edp ranks.
    for e in range(128):
        assert sum(e in r for r in ranges) == p.edp


def test_ep_equals_world():
    p = ParallelDims(world_size=4, ep=4)
    assert p.edp == 1
    assert [p.expert_range(r, 8) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_fsdp_without_ep():
    p = ParallelDims(world_size=2, ep=1)
    assert p.fsdp_enabled and not p.ep_enabled
    assert p.edp == 2 and p.expert_range(1, 8) == range(0, 8)


@pytest.mark.parametrize("world_size,ep", [(4, 3), (2, 4), (6, 4), (4, 0), (0, 1), (4, -2)])
def test_invalid_ep(world_size, ep):
    with pytest.raises(ValueError, match="expert_parallel_degree"):
        ParallelDims(world_size=world_size, ep=ep)

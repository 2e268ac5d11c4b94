"""CPU prediction of af_pipe runs (planner/cpu_predict.py): the runtime's posting order of
row receives, FSDP2 over attention groups, the interleaved stage timing. Hand-computed
values, no micro-benchmark runs."""

import pytest
import torch

from torchtitan_disagmoe.planner.calibrate import (
    Calibration,
    Linear,
    StageFits,
    _interleaved_times,
)
from torchtitan_disagmoe.planner.cpu_predict import (
    FSDP_GATHER,
    FSDP_REDUCE,
    ModelShape,
    post_order_deps,
    predict_af_pipe,
    with_fsdp_ops,
    with_post_ops,
)


def _const_calibration(stage_s: float, fsdp: dict | None = None) -> Calibration:
    c = Linear(stage_s, 0.0)
    stages = StageFits("qwen3_moe/debug", {1: c, 2: c}, {1: c, 2: c}, c, c, {8: c, 4: c, 2: c}, {8: c, 4: c, 2: c},
                       Linear(0.0, 0.0))
    comm = {w: {"latency": 0.0, "bandwidth": 1e30, "post": 0.0, "all_reduce": 0.0, "all_to_all": 0.0,
                "fsdp_unit": 0.0} for w in (2, 3, 4)}
    comm[2].update(fsdp or {})
    return Calibration(2, stages, comm, {"tail": 0.0, "params": 0})


def test_post_ops_split_by_role_and_receives_post_in_order():
    programs = {0: [("dispatch", 0, 0), ("dispatch", 0, 1), ("combine", 0, 0), ("combine", 0, 1)],
                1: [("dispatch", 0, 0), ("dispatch", 0, 1), ("combine", 0, 0), ("combine", 0, 1)]}
    sender = lambda op, rank: (rank == 0) == (op[0] == "dispatch")  # rank 0 sends dispatch, rank 1 combine
    posted = with_post_ops(programs, sender)
    assert posted[0][:2] == [("post_send_dispatch", 0, 0), ("dispatch", 0, 0)]
    assert posted[1][:2] == [("post_recv_dispatch", 0, 0), ("dispatch", 0, 0)]
    # posting a row receive waits for the previous row transfer the rank receives
    assert post_order_deps(posted) == {("post_recv_dispatch", 0, 1): [("dispatch", 0, 0)],
                                       ("post_recv_combine", 0, 1): [("combine", 0, 0)]}
    assert with_post_ops(programs)[1][0] == ("post_dispatch", 0, 0)  # without roles: one name


def test_fsdp_ops_gather_once_and_reduce_at_the_last_backward():
    ops = [("attention_forward", 0, 0), ("attention_forward", 0, 1), ("attention_backward", 0, 0),
           ("attention_backward", 0, 1), ("post_send_combine_grad", 0, 1)]
    programs, deps = with_fsdp_ops({0: ops, 1: [("expert_forward", 0, 0)]}, {0}, microbatches=2)
    assert programs[0] == [(FSDP_GATHER, 0, 0)] + ops[:4] + [(FSDP_REDUCE, 0, 0), ops[4]]
    assert programs[1] == [("expert_forward", 0, 0)]  # not an FSDP rank
    assert deps == {("attention_forward", 0, 0): [(FSDP_GATHER, 0, 0)], ops[4]: [(FSDP_REDUCE, 0, 0)]}
    # prefetch: the first stage's gather at the start, the next one's as a stage starts
    two = [("attention_forward", 0, 0), ("attention_forward", 2, 0)]
    programs, deps = with_fsdp_ops({0: two}, {0}, microbatches=1, prefetch=True)
    assert programs[0] == [(FSDP_GATHER, 0, 0), (FSDP_GATHER, 2, 0), two[0], two[1]]
    assert deps == {two[0]: [(FSDP_GATHER, 0, 0)], two[1]: [(FSDP_GATHER, 2, 0)]}


def test_fsdp_prediction_by_hand():
    shape = ModelShape.of("qwen3_moe", "debug")
    # units per A-stage: attention_norm, attention, ffn_norm, router (+ embedding in layer 0);
    # the head's norm and output
    assert shape.fsdp_units == {0: 5, 1: 4, 2: 4, 3: 4, 4: 2}
    g, r, h, e = 1e-3, 2e-3, 1e-4, 4e-4
    cal = _const_calibration(1e-3, {"fsdp_af_gather": g, "fsdp_af_reduce": r, "fsdp_af_hook": h,
                                    "fsdp_af_gather_exposed": e})
    cal.cores = 4  # no transfer starts while every core computes (no scheduler slice)
    # A2 F1, one micro-batch, the runtime before its prefetch: the chain of 18 stages of
    # 1 ms (the two attention ranks run side by side); every stage's gather sits after its
    # inputs arrive, before its forward, its reduce-scatter before what follows its
    # backward: 19 units x (g + r); hooks in each of the 10 attention-side calls: 19 x 2 x h;
    # nothing else costs (free transfers, no tail)
    sharded = predict_af_pipe(cal, 2, 1, 1, 1, global_batch=8, shape=shape, fsdp_prefetch=False)
    assert sharded.step_s == pytest.approx(0.018 + 19 * (g + r) + 38 * h)
    # with the prefetch only the first stage's gather (5 units) waits whole; the others run
    # beside the previous stage and F (>= 4 ms, longer than their 4 x 0.6 ms), leaving
    # e per unit in each first forward
    prefetched = predict_af_pipe(cal, 2, 1, 1, 1, global_batch=8, shape=shape)
    assert prefetched.step_s == pytest.approx(0.018 + 5 * (g - e) + 19 * e + 19 * r + 38 * h)
    replicas = predict_af_pipe(cal, 2, 1, 1, 1, global_batch=8, shape=shape, fsdp=False)
    assert replicas.step_s == pytest.approx(0.018)  # all-reduces free here
    # one rank per attention group: nothing to shard
    assert predict_af_pipe(cal, 1, 1, 1, 1, global_batch=8, shape=shape).step_s == pytest.approx(0.018)


def test_interleaved_times_takes_turns():
    order = []

    def job(name):
        def forward():
            order.append(name)
            return [torch.ones(2, requires_grad=True) * 2]
        return forward
    times = _interleaved_times([job("a"), job("b")], repeats=3)
    assert order == ["a", "b"] * 4  # a warm-up round, then 3 rounds of turns
    assert len(times) == 2 and all(f > 0 and b > 0 for f, b in times)


def test_rows_arrive_late_while_their_sender_computes():
    from torchtitan_disagmoe.planner.simulate import simulate

    chain = {0: [("attention_forward", 0, 0), ("dispatch", 0, 0), ("attention_forward", 1, 0)],
             1: [("dispatch", 0, 0), ("expert_forward", 0, 0)]}
    deps = {("dispatch", 0, 0): [("attention_forward", 0, 0)], ("expert_forward", 0, 0): [("dispatch", 0, 0)]}
    duration = lambda op, rank: 5.0 if op == ("attention_forward", 1, 0) else (0.0 if op[0] == "dispatch" else 1.0)
    sender = lambda op, rank: rank == 0
    plain = simulate(chain, duration, deps, is_sender=sender)
    late = simulate(chain, duration, deps, is_sender=sender, sender_busy_fn=lambda op: 0.5)
    # rank 0 computes [1, 6] when the rows would arrive at 1: they arrive at 1.5
    assert plain.finish[("expert_forward", 0, 0)] == pytest.approx(2.0)
    assert late.finish[("expert_forward", 0, 0)] == pytest.approx(2.5)
    # a sender that waits (nothing left to compute) delivers at once
    idle = {0: chain[0][:2], 1: chain[1]}
    assert simulate(idle, duration, deps, is_sender=sender,
                    sender_busy_fn=lambda op: 0.5).finish[("expert_forward", 0, 0)] == pytest.approx(2.0)

"""The planner's calibration from the runtime's own timelines (planner/runtime_trace.py) and
what the CPU prediction does with it; hand-made timelines and hand-computed values."""

import pytest

from torchtitan_disagmoe.planner.calibrate import Calibration, Linear, StageFits
from torchtitan_disagmoe.planner.cpu_predict import ModelShape, predict_af_pipe
from torchtitan_disagmoe.planner.runtime_trace import (
    action_samples,
    expected_rows,
    fit_samples,
    fsdp_costs,
)
from torchtitan_disagmoe.planner.simulate import simulate


def _event(name, stage, mb=0, wall=1.0, waited=0.0, cpu=1.0):
    return [name, stage, mb, 0.0, wall, waited, cpu]


def test_action_samples_name_every_action_of_an_attention_and_an_expert_rank():
    # two layers; the attention rank runs A(0), A(1) and the head (stage 4)
    attention = {"pool": "attention", "num_layers": 2, "events": [
        _event("FORWARD", 0, cpu=1.0), _event("SEND_F", 0, cpu=0.1), _event("RECV_F", 2, cpu=0.2),
        _event("FORWARD", 2, cpu=1.1), _event("SEND_F", 2, cpu=0.1), _event("RECV_F", 4, cpu=0.2),
        _event("FORWARD", 4, cpu=2.0), _event("FULL_BACKWARD", 4, cpu=3.0), _event("SEND_B", 4, cpu=0.3),
        _event("RECV_B", 2, cpu=0.4), _event("FULL_BACKWARD", 2, cpu=1.5), _event("SEND_B", 2, cpu=0.3),
        _event("RECV_B", 0, cpu=0.4), _event("FULL_BACKWARD", 0, cpu=1.6), _event("WAIT_SENDS", -1, cpu=0.01)]}
    got = action_samples(attention, tokens=512, ep=2, num_experts=8, top_k=2)
    rows = 512 * (1 - 6 / 28)  # a token misses a rank of 4 of 8 experts with C(4,2)/C(8,2)
    assert expected_rows(512, 8, 2, 2) == pytest.approx(rows)
    assert got["attention_forward/2"] == [(512, 1.0), (512, 1.1)]
    assert got["head_forward"] == [(512, 2.0)] and got["head_backward"] == [(512, 3.0)]
    assert got["attention_backward/2"] == [(512, 1.5), (512, 1.6)]
    # x of a post: rows over both expert ranks; the head's SEND_F/RECV_B and A(0)'s
    # RECV_F/SEND_B have nothing to post
    assert got["post_send_dispatch"] == [(pytest.approx(2 * rows), 0.1)] * 2
    assert got["post_recv_combine"] == [(pytest.approx(2 * rows), 0.2)] * 2
    assert len(got["post_send_combine_grad"]) == 2 and len(got["post_recv_dispatch_grad"]) == 2
    assert "WAIT_SENDS" not in str(sorted(got))
    expert = {"pool": "expert", "num_layers": 2, "events": [
        _event("RECV_F", 1, cpu=0.2), _event("FORWARD", 1, cpu=0.7), _event("SEND_F", 1, cpu=0.1),
        _event("RECV_B", 1, cpu=0.2), _event("FULL_BACKWARD", 1, cpu=0.9), _event("SEND_B", 1, cpu=0.1)]}
    got = action_samples(expert, tokens=512, ep=2, num_experts=8, top_k=2)
    # 4 local experts; x = routed copies expected on this rank: 512 x 2 / 2
    assert got["expert_forward/4"] == [(512, 0.7)] and got["expert_backward/4"] == [(512, 0.9)]
    assert set(got) == {"expert_forward/4", "expert_backward/4", "post_recv_dispatch", "post_send_combine",
                        "post_recv_combine_grad", "post_send_dispatch_grad"}


def test_fit_samples_takes_the_median_at_each_size():
    stages, posts = fit_samples({"attention_forward/1": [(128, 1.0), (128, 3.0), (128, 2.0), (256, 4.0)],
                                 "head_forward": [(128, 1.0), (256, 2.0)],
                                 "post_send_dispatch": [(100, 0.1), (200, 0.3)]})
    assert stages.attention_forward[1].xs == [128, 256] and stages.attention_forward[1].ys == [2.0, 4.0]
    assert stages.head_forward(192) == pytest.approx(1.5)
    assert posts["post_send_dispatch"](150) == pytest.approx(0.2)


def test_fsdp_costs_take_the_rank_held_least_and_the_cpu_beyond_the_plain_stage():
    def record(rank_events):
        return {"pool": "attention", "num_layers": 1, "events": rank_events}
    # stage 0 has 2 units: forward held 0.4 / 0.2 s (wall - waited - cpu), backward 1.0 / 1.4;
    # without FSDP2 the forward costs 0.8 s of CPU and the backward 1.6 s
    a = record([_event("FORWARD", 0, wall=2.0, waited=0.6, cpu=1.0), _event("FULL_BACKWARD", 0, wall=3.0, cpu=2.0)])
    b = record([_event("FORWARD", 0, wall=1.2, cpu=1.0), _event("FULL_BACKWARD", 0, wall=3.6, cpu=2.2)])
    expert = {"pool": "expert", "num_layers": 1, "events": [_event("FORWARD", 1, wall=9.0, cpu=1.0)]}
    plain = StageFits("runtime", {1: Linear(0.8, 0.0)}, {1: Linear(1.6, 0.0)})
    got = fsdp_costs([a, b, expert], units={0: 2}, stages=plain, tokens=512)
    assert got["fsdp_af_gather_exposed"] == [pytest.approx(0.1)]
    assert got["fsdp_af_reduce"] == [pytest.approx(0.5)]
    assert got["fsdp_af_forward_cpu"] == [pytest.approx(0.1)]  # (1.0 - 0.8) / 2 units
    assert got["fsdp_af_backward_cpu"] == [pytest.approx(0.25)]  # (2.1 - 1.6) / 2


def test_cpu_bound_collective_shares_the_cores():
    # ranks 0 and 1 reduce together (2 s alone) while rank 2 computes for 10 s, 2 cores:
    # 2 gloo threads + 1 compute op on 2 cores -> the collective takes 1.5x
    programs = {0: [("reduce_scatter_fsdp", 0, 0)], 1: [("reduce_scatter_fsdp", 0, 0)],
                2: [("expert_forward", 0, 0)]}
    duration = lambda op, rank: 2.0 if op[0].startswith("reduce") else 10.0
    plain = simulate(programs, duration, cores=2)
    cpu_bound = simulate(programs, duration, cores=2, cpu_bound_fn=lambda op: op[0].startswith("reduce"))
    assert plain.finish[("reduce_scatter_fsdp", 0, 0)] == pytest.approx(2.0)
    assert cpu_bound.finish[("reduce_scatter_fsdp", 0, 0)] == pytest.approx(3.0)
    assert simulate(programs, duration, cores=4, cpu_bound_fn=lambda op: True).makespan == pytest.approx(10.0)


def _runtime_calibration(stage_s: float, post_s: float) -> Calibration:
    """Bare stage functions at 1 s (must be ignored) and the runtime's actions at
    ``stage_s``, its posts at ``post_s``."""
    slow, c = Linear(1.0, 0.0), Linear(stage_s, 0.0)
    bare = StageFits("qwen3_moe/debug", {1: slow}, {1: slow}, slow, slow, {8: slow}, {8: slow}, Linear(0.0, 0.0))
    runtime = StageFits("runtime", {1: c, 2: c}, {1: c, 2: c}, c, c, {8: c, 4: c}, {8: c, 4: c})
    posts = {name: Linear(post_s, 0.0).__dict__ for name in (
        "post_send_dispatch", "post_recv_dispatch", "post_send_combine", "post_recv_combine",
        "post_send_dispatch_grad", "post_recv_dispatch_grad", "post_send_combine_grad", "post_recv_combine_grad")}
    comm = {w: {"latency": 0.0, "bandwidth": 1e30, "post": 0.5, "all_reduce": 0.0, "all_to_all": 0.0,
                "fsdp_unit": 0.0} for w in (2, 3, 4)}
    return Calibration(4, bare, comm, {"tail": 0.0, "params": 0, "tokens": 1024, "forward_backward": 50.0},
                       runtime={"stages": runtime.to_json(), "posts": posts})


def test_prediction_uses_the_runtime_actions_when_calibrated():
    shape = ModelShape.of("qwen3_moe", "debug")
    # A1 F1, one micro-batch: 18 stages of 1 ms on the chain, and before each of the 16
    # transfers its sender's post (0.1 ms); each receiver posted while the other pool
    # computed. No stage scale (it would be 50 / 18 with these bare-function numbers).
    pred = predict_af_pipe(_runtime_calibration(1e-3, 1e-4), 1, 1, 1, 1, global_batch=8, shape=shape)
    assert pred.step_s == pytest.approx(0.018 + 16e-4)


def test_send_posted_while_the_cores_are_taken_waits_off_them():
    # r0 computes 1 s then posts a send (1 s of CPU); r1, r2 compute 10 s; 2 cores.
    # [0, 1.5]: three ops at 2/3. At 1.5 the post finds both cores taken by r1, r2: it
    # waits 0.5 s off the cores (they run at full speed), then runs at 2/3: ends at 3.5.
    programs = {0: [("attention_forward", 0, 0), ("post_send_dispatch", 0, 0)],
                1: [("expert_forward", 0, 0)], 2: [("expert_forward", 1, 0)]}
    duration = lambda op, rank: 10.0 if op[0] == "expert_forward" else 1.0
    blocked = simulate(programs, duration, cores=2, blocked_start_fn=lambda op: 0.5 * op[0].startswith("post_send"))
    post = [iv for iv in blocked.intervals[0] if iv.op[0] == "post_send_dispatch"][0]
    assert (post.start, post.end) == (pytest.approx(1.5), pytest.approx(3.5))
    # r1's 10 s: 1.0 done by 1.5, 0.5 more by 2.0, 1.0 more by 3.5, the last 7.5 alone
    assert blocked.finish[("expert_forward", 0, 0)] == pytest.approx(11.0)
    plain = simulate(programs, duration, cores=2)
    assert plain.finish[("post_send_dispatch", 0, 0)] == pytest.approx(3.0)

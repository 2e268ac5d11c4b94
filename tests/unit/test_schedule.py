"""AF-Pipe schedules without a process group: validity over a grid of shapes, the
in-flight bound, bubbles against hand counts, and the validator catching broken lists."""

import itertools

import pytest

from torchtitan_disagmoe.distributed.pipelining_ir import BACKWARD, FORWARD, _Action
from torchtitan_disagmoe.distributed.schedule import (AFPipeShape, build_af_pipe_schedule, format_schedule,
                                                      generate_compute_order, lower_with_comms, validate)


@pytest.mark.parametrize("layers,p,mbs,bound,lag", [
    (layers, p, mbs, bound, lag)
    for layers, p, mbs, bound, lag in itertools.product([1, 2, 4, 6], [1, 2, 3], [1, 2, 4, 8], [0, 1, 2], [0, 1, 2])
    if layers % p == 0])
def test_generated_schedules_are_valid(layers, p, mbs, bound, lag):
    shape = AFPipeShape(layers, p, mbs, bound, lag)
    result = generate_compute_order(shape)
    assert result.peak_inflight <= shape.inflight_bound
    validate(shape, lower_with_comms(shape, result.order))  # raises with the grid if not


def test_one_layer_one_microbatch_is_the_plain_chain():
    """A(0) F(0) head, then backward: 3 + 3 unit steps, each waiting for the previous."""
    result = generate_compute_order(AFPipeShape(1, 1, 1, transfer_ticks=0))
    assert result.makespan == 6
    assert result.order[0] == [_Action(0, FORWARD, 0), _Action(2, FORWARD, 0), _Action(2, BACKWARD, 0),
                               _Action(0, BACKWARD, 0)]
    assert result.order[1] == [_Action(1, FORWARD, 0), _Action(1, BACKWARD, 0)]


def test_microbatches_fill_the_bubbles():
    """Without overlap (one micro-batch at a time) the step would take M x the chain; the
    AF-Pipe keeps the attention pool busy while the expert pool works on another
    micro-batch, so its idle time stays a fill-and-drain constant as M grows."""
    layers = 4
    chain = 2 * (2 * layers + 1)  # forward and backward of every stage, one after another
    idle = {}
    for mbs in (1, 2, 4, 8, 16, 32):
        result = generate_compute_order(AFPipeShape(layers, 1, mbs, transfer_ticks=0))
        attention_work = mbs * 2 * (layers + 1)  # F and B of A(0..L-1) and the head
        idle[mbs] = result.makespan - attention_work
        assert result.makespan < mbs * chain or mbs == 1
    assert idle[1] == chain - 2 * (layers + 1)  # alone, the attention pool waits for every expert stage
    assert idle[32] == idle[16] == idle[8] == layers  # a constant fill + drain, here 4 ticks
    # The busier pool (attention: L+1 stages per micro-batch against L) is idle 4 of 164
    # ticks at 16 micro-batches, against 8 of 18 without overlap.
    assert idle[16] / (16 * 2 * (layers + 1) + idle[16]) < 0.03


def test_transfer_time_keeps_more_microbatches_in_flight():
    """With transfers as long as a stage, two micro-batches cannot hide them; the generator
    admits more, and the busier pool stays almost fully busy."""
    no_lag = generate_compute_order(AFPipeShape(4, 1, 8, transfer_ticks=0))
    lag = generate_compute_order(AFPipeShape(4, 1, 8, transfer_ticks=1))
    assert lag.peak_inflight > no_lag.peak_inflight
    assert lag.busy[0] / lag.makespan > 0.85


def test_inflight_bound_caps_live_microbatches():
    result = generate_compute_order(AFPipeShape(4, 2, 8, max_inflight=2))
    assert result.peak_inflight == 2
    assert generate_compute_order(AFPipeShape(4, 2, 8)).peak_inflight > 2


def test_validator_rejects_backward_before_forward_and_prints_the_grid():
    shape = AFPipeShape(1, 1, 1)
    lowered = build_af_pipe_schedule(shape)
    broken = {r: list(a) for r, a in lowered.items()}
    broken[1] = [a for a in broken[1] if a.computation_type in (FORWARD, BACKWARD)][::-1]
    with pytest.raises(ValueError, match="before its forward") as info:
        validate(shape, broken)
    assert "Rank 0" in str(info.value) and "Step" in str(info.value)


def test_validator_rejects_a_missing_send():
    shape = AFPipeShape(2, 1, 2)
    lowered = build_af_pipe_schedule(shape)
    broken = {r: [a for a in acts if str(a) != "0SEND_F1"] for r, acts in lowered.items()}
    with pytest.raises(ValueError, match="do not match"):
        validate(shape, broken)


def test_printer_shows_every_rank():
    text = format_schedule(build_af_pipe_schedule(AFPipeShape(2, 2, 2)))
    assert all(f"Rank {r}" in text for r in range(4)) and "SEND_F" in text

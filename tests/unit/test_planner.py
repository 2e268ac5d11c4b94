"""Planner: cost formulas, routing expectation, memory check, search, simulator, CLI,
CPU calibration (with injected measurements).

Fast and hermetic: no micro-benchmarks run (``this-machine`` reads an injected result).
"""

import json
import time

import pytest

from torchtitan_disagmoe.distributed.disagg_dims import DisaggDims
from torchtitan_disagmoe.models.moe import MoEArgs
from torchtitan_disagmoe.models.qwen3_moe import Qwen3MoEArgs
from torchtitan_disagmoe.planner.__main__ import main
from torchtitan_disagmoe.planner.af_pipe import AFLayout, estimate_af_pipe
from torchtitan_disagmoe.planner.calibrate import (
    Calibration,
    Linear,
    StageFits,
    fit_linear,
    fit_points,
)
from torchtitan_disagmoe.planner.clusters import Cluster, build_cluster
from torchtitan_disagmoe.planner.cost import Efficiency, ModelCosts
from torchtitan_disagmoe.planner.cpu_predict import (
    AF_GRID,
    ModelShape,
    colocated_program,
    predict_af_pipe,
    predict_colocated,
    scheduler_slice_s,
    stage_scale,
    with_post_ops,
)
from torchtitan_disagmoe.planner.memory import MemoryPolicy
from torchtitan_disagmoe.planner.models import load_model_args, mean_keys
from torchtitan_disagmoe.planner.programs import (
    af_dependencies,
    af_sender_fn,
    hoist_receives,
    schedule_program_per_rank,
)
from torchtitan_disagmoe.planner.report import CONTRACT_FIELDS
from torchtitan_disagmoe.planner.routing import (
    RoutingModel,
    brute_force_distinct_ranks,
    distinct_ranks_from_ids,
    expected_distinct_ranks,
)
from torchtitan_disagmoe.planner.search import plan, search_af_pipe
from torchtitan_disagmoe.planner.simulate import simulate

FAKE_MACHINE = {"cores": 2, "gemm_flops_per_core": 1.0e11, "attention_flops_per_core": 4.0e10,
                "mem_bw": 1.0e10, "mem_bytes": 16 * 2**30, "p2p_bw": 2.0e9, "p2p_latency": 1e-4}


def tiny_args() -> Qwen3MoEArgs:
    return Qwen3MoEArgs(vocab_size=16, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, moe_inter_dim=6,
                        max_seq_len=64, moe=MoEArgs(num_experts=4, top_k=2, num_shared_experts=0))


def tiny_cluster(gpus_per_node: int = 1, nodes: int = 2) -> Cluster:
    return Cluster("toy", nodes, gpus_per_node, peak_flops=1000.0, hbm_bytes=1e9, hbm_bw=1e6,
                   intra_bw=100.0, inter_bw=10.0, intra_latency=0.0, inter_latency=0.0, elem_bytes=2)


# ---- cost formulas ------------------------------------------------------------------------
def test_layer_flops_and_bytes_by_hand():
    args = tiny_args()
    costs = ModelCosts(args, 8, tiny_cluster(), Efficiency(gemm=0.5, attention=0.25, network=1.0, hbm=0.8))
    lc = costs.layers[1]
    # attention params: q 64 + k,v 64 + o 64 + qk-norm 8 = 200; router 8 x 4 = 32
    assert args.attention_params() == 200
    assert lc.gemm_flops == 2 * (200 + 32)
    assert lc.attn_flops == 2 * 2 * (4 + 4) * 4.5  # causal: mean keys (8 + 1) / 2
    assert lc.routed_flops == 2 * 2 * (3 * 8 * 6)
    assert lc.a_params == 200 + 2 * 8 + 32
    assert costs.head_flops == 2 * 8 * 16
    assert 3 * costs.forward_flops_per_token() == pytest.approx(args.flops_per_token(8))
    # rows: D elem + 4K weights + 8(K+1) ids; D elem + 8 token index; grads D elem + 4K, D elem
    assert (costs.dispatch_row, costs.combine_row) == (16 + 8 + 24, 16 + 8)
    assert (costs.dispatch_grad_row, costs.combine_grad_row) == (16 + 8, 16)
    n = 2 * (1 - 1 / 6)  # E=4, K=2 over 2 ranks: miss probability C(2,2)/C(4,2)
    out_b, in_b = costs.af_bytes_per_token(2)
    assert out_b == pytest.approx(n * (48 + 16)) and in_b == pytest.approx(n * (24 + 24))
    # colocated EP=2: one of the two copies leaves the rank, 4 all-to-alls of D elem rows
    assert costs.ep_a2a_bytes_per_token(2) == (0.0, pytest.approx(64.0))
    two_per_node = ModelCosts(args, 8, tiny_cluster(gpus_per_node=2, nodes=1))
    assert two_per_node.ep_a2a_bytes_per_token(2) == (pytest.approx(64.0), 0.0)
    assert costs.ep_a2a_bytes_per_token(2, "rank") == (0.0, pytest.approx(4 * n / 2 * 16))


def test_kernel_times_by_hand():
    costs = ModelCosts(tiny_args(), 8, tiny_cluster(), Efficiency(gemm=0.5, attention=0.25, network=1.0, hbm=0.8))
    fwd, bwd = costs.attention_stage(costs.layers[0], 10)
    assert fwd == pytest.approx(464 * 10 / 500 + 144 * 10 / 250)
    assert bwd == pytest.approx(2 * fwd)
    fwd_rc, bwd_rc = costs.attention_stage(costs.layers[0], 10, recompute=True)
    assert bwd_rc == pytest.approx(3 * fwd_rc)
    assert costs.expert_stage(10, 2)[0] == pytest.approx(10 * 2 * 144 / 500)
    # no tokens: the HBM floor (weights read once forward) is all that is left
    assert costs.expert_stage(0, 2)[0] == pytest.approx(2 * 144 * 2 / (1e6 * 0.8))
    assert costs.link_time(0.0, 50.0) == pytest.approx(5.0) and costs.link_time(300.0, 20.0) == pytest.approx(3.0)
    assert costs.overlapped(2.0, 1.0) == pytest.approx(2.0 + 0.15 * 1.0)


def test_gpt_oss_description_matches_model_card():
    args = load_model_args("gpt_oss", "120B")
    total, active = args.num_params()
    assert total == pytest.approx(116.8e9, rel=0.002)  # model card: 116.8 B
    assert active - args.vocab_size * args.dim == pytest.approx(5.13e9, rel=0.01)  # 5.1 B active
    assert mean_keys(args, 0, 4096) < 128 < mean_keys(args, 1, 4096)  # banded then full
    costs = ModelCosts(args, 4096, build_cluster("h800", 1))
    assert 3 * costs.forward_flops_per_token() == pytest.approx(args.flops_per_token(4096))


# ---- routing -------------------------------------------------------------------------------
@pytest.mark.parametrize("experts,top_k,ranks", [(8, 2, 2), (8, 2, 4), (8, 3, 8), (12, 4, 3), (16, 6, 4), (6, 6, 3)])
def test_distinct_ranks_matches_enumeration(experts, top_k, ranks):
    assert expected_distinct_ranks(experts, top_k, ranks) == pytest.approx(
        brute_force_distinct_ranks(experts, top_k, ranks))


def test_distinct_ranks_from_measured_routing():
    trace = [[0, 1], [0, 4], [2, 7], [5, 6]]
    assert distinct_ranks_from_ids(trace, 8, 2) == pytest.approx((1 + 2 + 2 + 1) / 4)
    model = RoutingModel(8, 2, trace)
    assert model.distinct_ranks(2) == pytest.approx(1.5) and model.imbalance(2) == pytest.approx(1.0)


# ---- memory and search -------------------------------------------------------------------
def test_memory_check_rejects_what_cannot_fit():
    costs = ModelCosts(load_model_args("qwen3_moe", "235B-A22B"), 4096, build_cluster("h800", 1))
    result = search_af_pipe(costs, 64)
    assert result.best is None and result.feasible == 0
    assert "GiB" in result.why_none() and "expert group" in result.why_none()
    est = estimate_af_pipe(costs, AFLayout(4, 4, 2, 1, 1), 64)
    assert not est.memory.fits and "needs" in est.memory.reason()
    assert all(b is None for b in plan(costs, 64).baselines.values())


@pytest.mark.parametrize("replication", [False, True])
def test_search_returns_a_valid_layout(replication):
    costs = ModelCosts(load_model_args("deepseek_moe", "16B"), 4096, build_cluster("h800", 2))
    best = search_af_pipe(costs, 256, replication=replication).best
    assert best is not None and best.memory.fits
    lay = AFLayout(**{k: best.layout[k] for k in AFLayout.__dataclass_fields__})
    assert lay.attention_gpus + lay.expert_gpus == 16
    p = lay.pipeline_depth
    assert lay.attention_gpus % p == 0 and lay.expert_gpus % p == 0 and 27 % p == 0
    lay.validate(27, 64, 256)
    if not replication:  # what the runtime accepts today
        DisaggDims(lay.attention_gpus, lay.expert_gpus, p, 27, 64).validate(16)
    assert 0 < best.mfu < 1 and best.step_time > 0


def test_search_of_1024_gpus_is_fast():
    for name, flavor in (("deepseek_moe", "16B"), ("qwen3_moe", "235B-A22B")):
        costs = ModelCosts(load_model_args(name, flavor), 4096, build_cluster("h800", 128))
        start = time.perf_counter()
        result = plan(costs)
        assert time.perf_counter() - start < 10
        assert result.recommended is not None
        assert result.recommended.num_gpus == 1024


# ---- simulator ----------------------------------------------------------------------------
def _two_rank_forward():
    """Attention rank 0, expert rank 1, one MoE layer then layer 1, 2 micro-batches."""
    programs = {
        0: [("attention_forward", 0, 0), ("dispatch", 0, 0), ("attention_forward", 0, 1), ("dispatch", 0, 1),
            ("combine", 0, 0), ("attention_forward", 1, 0), ("combine", 0, 1), ("attention_forward", 1, 1)],
        1: [("dispatch", 0, 0), ("expert_forward", 0, 0), ("dispatch", 0, 1), ("combine", 0, 0),
            ("expert_forward", 0, 1), ("combine", 0, 1)],
    }
    durations = {"attention_forward": 2.0, "dispatch": 1.0, "expert_forward": 3.0, "combine": 1.0}
    deps = {}
    for m in (0, 1):
        deps[("dispatch", 0, m)] = [("attention_forward", 0, m)]
        deps[("expert_forward", 0, m)] = [("dispatch", 0, m)]
        deps[("combine", 0, m)] = [("expert_forward", 0, m)]
        deps[("attention_forward", 1, m)] = [("combine", 0, m)]
    return programs, (lambda op, rank: durations[op[0]]), deps


def test_simulator_makespan_by_hand():
    programs, duration, deps = _two_rank_forward()
    # A0 m0 [0,2], m1 [2,4]; dispatch m0 [2,3]; F m0 [3,6]; F posts dispatch m1 at 6: [6,7];
    # combine m0 [7,8]; F m1 [7,10]; A1 m0 [8,10]; combine m1 [10,11]; A1 m1 [11,13]
    result = simulate(programs, duration, deps)
    assert result.makespan == pytest.approx(13.0)
    assert result.busy_time(0) == pytest.approx(8.0) and result.busy_time(1) == pytest.approx(6.0)
    assert result.finish[("combine", 0, 0)] == pytest.approx(8.0)
    # blocking transfers: A0 m1 waits for dispatch m0 [2,3] -> [3,5], ... -> 14
    assert simulate(programs, duration, deps, blocking=True).makespan == pytest.approx(14.0)
    # latency 0.5 delays consumers, not links: dispatch m0 [2,3] arrives 3.5, F m0 [3.5,6.5],
    # dispatch m1 [6.5,7.5], combine m0 [7.5,8.5] (half duplex) arrives 9, F m1 [8,11],
    # combine m1 [11,12] arrives 12.5, A1 m1 [12.5,14.5]
    assert simulate(programs, duration, deps, latency_fn=lambda op: 0.5).makespan == pytest.approx(14.5)


def test_simulator_full_duplex_and_deadlock():
    programs = {0: [("dispatch", 0, 0), ("combine", 0, 0)], 1: [("dispatch", 0, 0), ("combine", 0, 0)]}
    both = {0: [("dispatch", 0, 0), ("combine", 0, 0)], 1: [("combine", 0, 0), ("dispatch", 0, 0)]}
    one = lambda op, rank: 1.0
    assert simulate(programs, one).makespan == pytest.approx(2.0)  # half duplex: one at a time
    sender = lambda op, rank: (rank == 0) == (op[0] == "dispatch")
    assert simulate(both, one, is_sender=sender).makespan == pytest.approx(1.0)  # opposite directions
    cycle = {0: [("attention_forward", 0, 0)], 1: [("expert_forward", 0, 0)]}
    deps = {("attention_forward", 0, 0): [("expert_forward", 0, 0)],
            ("expert_forward", 0, 0): [("attention_forward", 0, 0)]}
    with pytest.raises(ValueError, match="deadlock"):
        simulate(cycle, one, deps)
    with pytest.raises(ValueError, match="no rank runs"):
        simulate({0: [("attention_forward", 1, 0)]}, one, {("attention_forward", 1, 0): [("combine", 0, 0)]})


@pytest.mark.parametrize("name,p", [("qwen3_moe", 1), ("qwen3_moe", 2), ("deepseek_moe", 1), ("deepseek_moe", 2)])
def test_simulator_replays_the_af_pipe_schedule(name, p):
    args = load_model_args(name, "debug")
    moe = [args.is_moe_layer(i) for i in range(args.n_layers)]
    dims = DisaggDims(2 * p, 2 * p, p, args.n_layers, args.moe.num_experts)
    programs = schedule_program_per_rank(dims, moe, 4)
    deps = af_dependencies(args.n_layers, moe, p)
    sender = af_sender_fn(lambda r: r < dims.attention_ranks, lambda r: dims.role(r).group, p)
    unit = simulate(programs, lambda op, rank: 1.0, deps, is_sender=sender)
    computes = sum(1 for ops in programs.values() for op in ops if op[0].endswith(("forward", "backward")))
    assert sum(unit.busy_time(r) for r in programs) == pytest.approx(computes)
    early = simulate(hoist_receives(programs, sender), lambda op, rank: 1.0, deps, is_sender=sender)
    assert 0 < early.makespan <= unit.makespan


# ---- CLI ------------------------------------------------------------------------------------
def _json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_exactly_the_contract_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHTITAN_DISAGMOE_CACHE_DIR", str(tmp_path))
    (tmp_path / "this_machine.json").write_text(json.dumps(FAKE_MACHINE))
    runs = [
        ["--model", "deepseek_moe", "--flavor", "16B", "--cluster", "h800", "--nodes", "2", "--seq-len", "4096"],
        ["--model", "qwen3_moe", "--flavor", "debug", "--cluster", "this-machine", "--seq-len", "128",
         "--global-batch", "8"],
        ["--config", "train_configs/deepseek_moe_16b.toml", "--cluster", "h100", "--nodes", "2"],
    ]
    for argv in runs:
        out = _json(capsys, argv)
        assert set(out) == {"recommended", "baselines", "speedup"}
        assert set(out["recommended"]) == set(CONTRACT_FIELDS)
        assert set(out["baselines"]) == set(out["speedup"]) == {"ep_1f1b_interleaved", "ep_overlap", "dualpipe"}
        for est in out["baselines"].values():
            assert est is None or set(est) == set(CONTRACT_FIELDS)
        rec = out["recommended"]
        assert rec["attention_gpus"] + rec["expert_gpus"] == (2 if "this-machine" in argv else 16)
    assert "details" in _json(capsys, runs[0] + ["--details"])


def test_this_machine_uses_the_cached_benchmark(tmp_path, monkeypatch):
    from torchtitan_disagmoe.planner import this_machine

    monkeypatch.setenv("TORCHTITAN_DISAGMOE_CACHE_DIR", str(tmp_path))
    calls = []
    data = this_machine.load_measurements(measure_fn=lambda: calls.append(1) or dict(FAKE_MACHINE))
    again = this_machine.load_measurements(measure_fn=lambda: calls.append(1) or dict(FAKE_MACHINE))
    assert data == again and calls == [1]
    cluster = build_cluster("this-machine", 1)
    assert (cluster.gpus_per_node, cluster.elem_bytes) == (2, 4)
    assert cluster.peak_flops == pytest.approx(1.0e11) and cluster.hbm_bytes == pytest.approx(8 * 2**30)
    assert this_machine.attention_efficiency(data) == pytest.approx(0.4)


def test_table_plot_and_timeline(capsys, tmp_path):
    argv = ["--model", "qwen3_moe", "--flavor", "30B-A3B", "--cluster", "h800", "--nodes", "2", "--seq-len", "4096",
            "--plot", str(tmp_path / "roof.png"), "--timeline", str(tmp_path / "timeline.png")]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "af_pipe (recommended)" in out.out and "ep_1f1b_interleaved" in out.out
    assert "simulated" in out.err
    assert (tmp_path / "roof.png").stat().st_size > 0 and (tmp_path / "timeline.png").stat().st_size > 0


def test_memory_policy_and_unknown_model():
    assert MemoryPolicy.for_elem(4).optimizer_bytes == 8
    assert MemoryPolicy().state_bytes(10, 2) == pytest.approx(10 * (2 + 4 + 6))
    with pytest.raises(ValueError, match="not a known model"):
        load_model_args("llama", "8B")
    with pytest.raises(ValueError, match="preset"):
        build_cluster("a100", 1)


# ---- calibration on this CPU (planner/calibrate.py, cpu_predict.py) -----------------------------


def test_simulator_shares_cores():
    programs = {r: [("attention_forward", 0, r)] for r in range(4)}
    duration = lambda op, rank: float(op[2] + 1)  # rank r computes r + 1 seconds alone
    assert simulate(programs, duration).makespan == pytest.approx(4.0)  # a core each
    # processor sharing, 2 cores: all 4 at rate 1/2 until r0 ends at 2 (r1..r3 have 1, 2, 3
    # left); 3 at rate 2/3: r1 ends at 3.5; 2 at rate 1: r2 ends at 4.5, r3 at 5.5
    shared = simulate(programs, duration, cores=2)
    assert shared.makespan == pytest.approx(5.5)
    assert [shared.intervals[r][0].end for r in range(4)] == pytest.approx([2.0, 3.5, 4.5, 5.5])
    assert shared.busy_time(3) == pytest.approx(5.5)  # wall time of the op, not its work
    # two hosts of one core: r0, r1 at 1/2 (r0 ends at 2, r1 at 3); r2, r3 (r2 at 6, r3 at 7)
    assert simulate(programs, duration, cores=1, host_of=lambda r: r // 2).makespan == pytest.approx(7.0)
    # capacity 1.5 (other load takes half a core): rates 3/8, 1/2, 3/4, 1: ends 8/3, 14/3, 6, 7
    assert simulate(programs, duration, cores=1.5).makespan == pytest.approx(7.0)
    # a rank waiting for a transfer takes no share: r1 waits for r0's dispatch
    chain = {0: [("attention_forward", 0, 0), ("dispatch", 0, 0)], 1: [("dispatch", 0, 0), ("expert_forward", 0, 0)],
             2: [("attention_forward", 1, 0)]}
    deps = {("dispatch", 0, 0): [("attention_forward", 0, 0)], ("expert_forward", 0, 0): [("dispatch", 0, 0)]}
    one = lambda op, rank: 1.0
    # 1 core: r0 and r2 at 1/2 until 2; dispatch [2, 3]; r1 alone [3, 4]
    assert simulate(chain, one, deps, cores=1).makespan == pytest.approx(4.0)
    with pytest.raises(ValueError, match="cores"):
        simulate(programs, duration, cores=0)


def test_fit_linear_and_calibration_round_trip():
    fit = fit_linear([128, 256, 512], [1e-3 + 2e-6 * x for x in (128, 256, 512)])
    assert fit.a == pytest.approx(1e-3) and fit.b == pytest.approx(2e-6)
    assert fit(1000) == pytest.approx(3e-3)
    through_origin = fit_linear([1, 2], [1.0, 3.0])  # intercept would be -1: refit through 0
    assert through_origin.a == 0 and through_origin.b == pytest.approx(7 / 5)
    with pytest.raises(ValueError):
        fit_linear([1], [1])
    # with its points a curve interpolates them (the head bends at 1,024 tokens), and
    # continues with the line's slope beyond them
    curve = fit_points([512, 128, 1024], [4.0, 1.0, 12.0])
    assert [curve(x) for x in (128, 320, 512, 768, 1024)] == pytest.approx([1.0, 2.5, 4.0, 8.0, 12.0])
    assert curve(2048) == pytest.approx(12.0 + curve.b * 1024) and curve(0) >= 0
    cal = _const_calibration(1e-3)
    cal.capacity = {2: 1.5, 4: 1.2}
    assert (cal.capacity_for(2), cal.capacity_for(3), cal.capacity_for(4)) == (1.5, 1.5, 1.2)
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    assert _const_calibration(1e-3).capacity_for(4) == 2.0  # none measured: the cores


def _const_calibration(stage_s: float, latency: float = 0.0, post: float = 0.0) -> Calibration:
    c = Linear(stage_s, 0.0)
    stages = StageFits("qwen3_moe/debug", {1: c, 2: c}, {1: c, 2: c}, c, c, {8: c, 4: c, 2: c}, {8: c, 4: c, 2: c},
                       Linear(0.0, 0.0))
    comm = {w: {"latency": latency, "bandwidth": 1e30, "post": post, "all_reduce": 0.0, "all_to_all": 0.0,
                "fsdp_unit": 0.0} for w in (2, 3, 4)}
    return Calibration(2, stages, comm, {"tail": 0.0, "params": 0})


def test_cpu_prediction_by_hand():
    shape = ModelShape.of("qwen3_moe", "debug")
    assert shape.n_layers == 4 and all(shape.moe_layers)
    assert sum(shape.attention_params.values()) + sum(shape.expert_params.values()) == 2_299_264
    # one micro-batch, A1 F1: every stage waits for the previous one, 18 stages of 1 ms
    # (A fwd 4 + head fwd + head bwd + A bwd 4, F fwd 4 + F bwd 4); free transfers, no tail
    one = predict_af_pipe(_const_calibration(1e-3), 1, 1, 1, 1, global_batch=8, shape=shape)
    assert one.step_s == pytest.approx(0.018) and one.tail_s == 0
    # each message's latency sits on the chain: 8 forward + 8 backward; with counts first
    # (NCCL's protocol) dispatch and combine take two messages each
    lat = predict_af_pipe(_const_calibration(1e-3, latency=1e-4), 1, 1, 1, 1, global_batch=8, shape=shape)
    assert lat.step_s == pytest.approx(0.018 + 16e-4)
    counts_first = predict_af_pipe(_const_calibration(1e-3, latency=1e-4), 1, 1, 1, 1, global_batch=8,
                                   shape=shape, bounded_rows=False)
    assert counts_first.step_s == pytest.approx(0.018 + 24e-4)
    # two micro-batches overlap A and F work: faster than twice the chain, slower than one
    two = predict_af_pipe(_const_calibration(1e-3), 1, 1, 1, 2, global_batch=8, shape=shape)
    assert 0.018 < two.step_s < 0.036
    for cfg in AF_GRID:  # every grid layout replays without deadlock
        assert predict_af_pipe(_const_calibration(1e-3), *cfg, global_batch=8, shape=shape).step_s > 0
    # colocated: one rank's list, all stages in series (collectives free): 18 stages
    assert predict_colocated(_const_calibration(1e-3), 2, 8, shape=shape).step_s == pytest.approx(0.018)
    # 4 ranks on 2 cores: twice the compute of 2 ranks
    assert predict_colocated(_const_calibration(1e-3), 4, 8, shape=shape).step_s == pytest.approx(0.036)
    assert len(colocated_program(4)) == 2 + 4 * 12 + 2
    with pytest.raises(ValueError, match="micro-batches"):
        predict_af_pipe(_const_calibration(1e-3), 2, 2, 1, 3, global_batch=8, shape=shape)


def test_post_ops_precede_every_transfer():
    programs = {0: [("attention_forward", 0, 0), ("dispatch", 0, 0)], 1: [("dispatch", 0, 0)]}
    assert with_post_ops(programs) == {0: [("attention_forward", 0, 0), ("post_dispatch", 0, 0), ("dispatch", 0, 0)],
                                       1: [("post_dispatch", 0, 0), ("dispatch", 0, 0)]}


def test_busy_host_latency_and_stage_scale():
    # 1 core: r0 and r2 share it until r0 ends at 2; dispatch [2, 3] starts while r2
    # computes (the host is busy), so it arrives 0.5 later than an idle one would
    programs = {0: [("attention_forward", 0, 0), ("dispatch", 0, 0)], 1: [("dispatch", 0, 0), ("expert_forward", 0, 0)],
                2: [("attention_forward", 1, 0)]}
    deps = {("dispatch", 0, 0): [("attention_forward", 0, 0)], ("expert_forward", 0, 0): [("dispatch", 0, 0)]}
    duration = lambda op, rank: 5.0 if rank == 2 else 1.0
    idle = simulate(programs, duration, deps, cores=1)
    busy = simulate(programs, duration, deps, cores=1, busy_latency_fn=lambda op: 0.5, busy_at=1)
    # idle: r1 [3, 5] at half speed beside r2; busy: arrives 3.5, r1 [3.5, 5.5]
    assert idle.finish[("expert_forward", 0, 0)] == pytest.approx(5.0)
    assert busy.finish[("expert_forward", 0, 0)] == pytest.approx(5.5)
    assert idle.makespan == busy.makespan == pytest.approx(7.0)  # r2's 5 s of work + 2 s shared
    assert scheduler_slice_s(2) == pytest.approx(1.5e-3) and scheduler_slice_s(1) == pytest.approx(0.75e-3)
    # the one-process step of 18 stages of 1 ms measured at 27 ms: every stage counts 1.5x
    cal = _const_calibration(1e-3)
    shape = ModelShape.of("qwen3_moe", "debug")
    assert stage_scale(cal, shape) == 1.0  # no one-process measurement
    cal.trainer = {"tokens": 1024, "forward_backward": 0.027, "tail": 0.0, "params": 0}
    assert stage_scale(cal, shape) == pytest.approx(1.5)
    one = predict_af_pipe(cal, 1, 1, 1, 1, global_batch=8, shape=shape)
    assert one.step_s == pytest.approx(0.027)

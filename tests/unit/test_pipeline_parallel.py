"""Colocated pipeline parallelism without a process group: config checks, rank grid,
stage placement, and the split of a meta model into stages that keep the full names."""

import pytest
import torch

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import load_job_config, with_overrides
from torchtitan_disagmoe.distributed.parallel_dims import ParallelDims
from torchtitan_disagmoe.distributed.pipeline_parallel import (microbatch_loss, split_into_stages,
                                                               stage_ids_for_rank, stage_layer_ranges)
from torchtitan_disagmoe.models import get_model_spec


def _pp_config(local_batch: int = 8, **parallelism) -> JobConfig:
    return with_overrides(JobConfig(), training={"local_batch_size": local_batch}, parallelism=parallelism)


@pytest.mark.parametrize("world,parallelism,local_batch", [
    (2, dict(pipeline_parallel_degree=2), 8),                                               # 1F1B, 2 x 2 layers
    (4, dict(pipeline_parallel_degree=2, expert_parallel_degree=2), 4),                     # pp 2 x dp 2, EP 2
    (4, dict(pipeline_parallel_degree=2, expert_parallel_degree=-1), 4),                    # -1: the dp ranks
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B"), 4),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="DualPipeV"), 4),
    (4, dict(pipeline_parallel_degree=4, pipeline_parallel_layers_per_stage=1), 8),
])
def test_good_pipeline_configs(world, parallelism, local_batch):
    config = _pp_config(local_batch, **parallelism)
    config.validate(world)
    if parallelism.get("expert_parallel_degree") == -1:
        assert config.expert_parallel_degree(world) == world // parallelism["pipeline_parallel_degree"]


@pytest.mark.parametrize("world,parallelism,local_batch,message", [
    (3, dict(pipeline_parallel_degree=2), 8, "must divide the number of ranks (NGPU = 3)"),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_layers_per_stage=3), 8, "4 layers do not split"),
    (4, dict(pipeline_parallel_degree=4, pipeline_parallel_schedule="Interleaved1F1B"), 8, "do not split"),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_layers_per_stage=1), 8, "runs 1 stage per rank"),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B",
             pipeline_parallel_layers_per_stage=2), 8, "needs >= 2 stages per rank"),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_microbatch_size=3), 8, "must divide training.local_batch"),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B"), 3, "multiple of 2"),
    (2, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="DualPipeV"), 2, "at least as many"),
    (4, dict(pipeline_parallel_degree=2, expert_parallel_degree=4), 4, "data-parallel ranks (NGPU 4 / pipeline"),
    (4, dict(pipeline_parallel_degree=2, data_parallel_shard_degree=4), 4, "data_parallel_shard_degree = 4"),
])
def test_bad_pipeline_configs(world, parallelism, local_batch, message):
    with pytest.raises(ValueError) as info:
        _pp_config(local_batch, **parallelism).validate(world)
    assert message in str(info.value) and "parallelism." in str(info.value)


def test_overlap_config_checks():
    _pp_config(expert_parallel_degree=2, expert_parallel_overlap=True).validate(2)
    with pytest.raises(ValueError, match=r"expert_parallel_overlap = true needs"):
        _pp_config(expert_parallel_degree=1, expert_parallel_overlap=True).validate(2)
    with pytest.raises(ValueError, match=r"parallelism\.expert_parallel_overlap_chunks = 0"):
        load_job_config(["--parallelism.expert_parallel_overlap_chunks", "0"])
    config = load_job_config(["--disagmoe.mode", "af_pipe", "--disagmoe.attention_ranks", "1",
                              "--disagmoe.expert_ranks", "1", "--parallelism.expert_parallel_overlap", "true"])
    with pytest.raises(ValueError, match=r"parallelism\.expert_parallel_overlap applies to colocated"):
        config.validate(2)


def test_rank_grid_pp2_dp2():
    """Pipeline rank outermost: ranks 0, 1 hold the first stage(s); EP over each pair."""
    dims = ParallelDims(world_size=8, ep=2, pp=2)
    assert (dims.dp, dims.edp, dims.pp) == (4, 2, 2) and dims.pp_enabled and dims.fsdp_enabled
    assert [dims.pp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [dims.dp_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [dims.ep_rank(r) for r in range(8)] == [0, 1] * 4
    assert [dims.edp_rank(r) for r in range(8)] == [0, 0, 1, 1] * 2
    assert not ParallelDims(world_size=2, pp=2).fsdp_enabled  # one data-parallel rank per stage
    with pytest.raises(ValueError, match="pipeline_parallel_degree = 3"):
        ParallelDims(world_size=4, pp=3)
    with pytest.raises(ValueError, match="expert_parallel_degree = 4"):
        ParallelDims(world_size=4, ep=4, pp=2)


def test_stage_placement():
    assert stage_layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # Looped: rank r holds r, r + pp, ...; V: r and 2pp - 1 - r.
    assert [stage_ids_for_rank(r, 4, 1, "1F1B") for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids_for_rank(r, 2, 3, "Interleaved1F1B") for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [stage_ids_for_rank(r, 3, 2, "DualPipeV") for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    # Every stage is held exactly once.
    held = sorted(s for r in range(3) for s in stage_ids_for_rank(r, 3, 2, "DualPipeV"))
    assert held == list(range(6))


@pytest.mark.parametrize("stage_ids,layers,first,last", [
    ([0, 2], ["0", "2"], True, False),   # Interleaved, pipeline rank 0 of 2 (4 stages)
    ([1, 3], ["1", "3"], False, True),
    ([0, 3], ["0", "3"], True, True),    # DualPipeV, rank 0: embedding and head on one rank
])
def test_split_keeps_full_parameter_names(stage_ids, layers, first, last):
    spec = get_model_spec("qwen3_moe")
    with torch.device("meta"):
        model = spec.model_cls(spec.get_flavor("debug"))
        full_names = {name for name, _ in model.named_parameters()}
        stages = split_into_stages(model, stage_ids, num_stages=4)
    names = {name for name, _ in model.named_parameters()}
    assert names <= full_names and list(model.layers.keys()) == layers
    assert any(n.startswith("tok_embeddings.") for n in names) == first
    assert any(n.startswith("output.") for n in names) == last
    # Stage modules share the model's modules under the same names.
    stage_names = set().union(*({n for n, _ in s.named_parameters()} for s in stages))
    assert stage_names == names
    params = dict(model.named_parameters())
    for stage in stages:
        for name, param in stage.named_parameters():
            assert param is params[name]


def test_split_covers_the_model_once():
    spec = get_model_spec("qwen3_moe")
    with torch.device("meta"):
        full = {n for n, _ in spec.model_cls(spec.get_flavor("debug")).named_parameters()}
        seen: list[str] = []
        for rank in range(2):
            model = spec.model_cls(spec.get_flavor("debug"))
            split_into_stages(model, stage_ids_for_rank(rank, 2, 2, "Interleaved1F1B"), num_stages=4)
            seen += [n for n, _ in model.named_parameters()]
    assert sorted(seen) == sorted(full)


def test_microbatch_losses_sum_to_the_batch_mean():
    torch.manual_seed(0)
    logits_BSV, labels_BS = torch.randn(4, 5, 11), torch.randint(0, 11, (4, 5))
    loss_fn = microbatch_loss(2)
    total = loss_fn(logits_BSV[:2], labels_BS[:2]) + loss_fn(logits_BSV[2:], labels_BS[2:])
    expected = torch.nn.functional.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten())
    torch.testing.assert_close(total, expected)

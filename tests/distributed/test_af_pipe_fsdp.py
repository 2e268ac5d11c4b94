"""FSDP2 and HSDP inside the attention group of af_pipe (and HSDP in colocated runs), and expert
replicas inside an expert group: with the default
``parallelism.data_parallel_shard_degree = -1`` the attention weights are DTensor shards
over the group (the parity matrix in test_af_pipe_parity.py then runs sharded for every
layout with 2 attention ranks per group); with 1 they are plain replicas averaged by
all-reduce. Both equal the single-process reference."""

import pytest

from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_distributed, run_single, spawn
from .test_af_pipe_parity import _config
from .test_colocated_parity import assert_matches_reference

pytestmark = pytest.mark.slow


def _placements(config, cache):
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache)
    try:
        params = dict(trainer.model.named_parameters())
        wq = params.get("layers.0.attention.wq.weight")
        trainer.train_step()
        runtime = trainer.layout.runtime
        return {"type": type(wq).__name__, "local_rows": wq.to_local().shape[0] if hasattr(wq, "to_local") else None,
                # each A-stage but the first has its weights gathered ahead, by the one before
                "prefetched": runtime.prefetched == len(runtime.fsdp_units) - 1 > 0}
    finally:
        trainer.close()


def test_attention_weights_are_sharded_over_the_group_by_default(tmp_path):
    config = _config(tmp_path / "out", "qwen3_moe", "debug", a=2, f=1, p=1, dp=2)
    got = spawn(3, _placements, config, str(tmp_path / "cache"))
    assert got == {"type": "DTensor", "local_rows": 64, "prefetched": True}  # wq: 128 rows over 2 ranks


def test_replicated_attention_matches_reference(tmp_path):
    cache = str(tmp_path / "cache")
    reference = run_single(_config(tmp_path / "ref", "qwen3_moe", "debug", steps=6), cache, steps=6)
    config = with_overrides(_config(tmp_path / "af", "qwen3_moe", "debug", a=2, f=1, p=1, dp=2, microbatches=2,
                                    steps=6), parallelism={"data_parallel_shard_degree": 1})
    result = run_distributed(config, 3, cache, steps=6)
    assert_matches_reference(result, reference)


def test_hsdp_attention_group_matches_reference(tmp_path):
    """HSDP inside an attention group of 4: 2 replica groups x FSDP2 over 2 ranks."""
    cache = str(tmp_path / "cache")
    reference = run_single(_config(tmp_path / "ref", "qwen3_moe", "debug", steps=4), cache, steps=4)
    config = with_overrides(_config(tmp_path / "af", "qwen3_moe", "debug", a=4, f=1, p=1, dp=4, microbatches=1,
                                    steps=4), parallelism={"data_parallel_replicate_degree": 2})
    assert spawn(5, _placements, config, cache) == {"type": "DTensor", "local_rows": 64, "prefetched": True}  # over 2
    assert_matches_reference(run_distributed(config, 5, cache, steps=4), reference)


def test_colocated_hsdp_matches_reference(tmp_path):
    cache = str(tmp_path / "cache")
    reference = run_single(_config(tmp_path / "ref", "qwen3_moe", "debug", steps=4), cache, steps=4)
    config = with_overrides(_config(tmp_path / "co", "qwen3_moe", "debug", dp=4, steps=4),
                            parallelism={"data_parallel_replicate_degree": 2, "expert_parallel_degree": 2})
    assert_matches_reference(run_distributed(config, 4, cache, steps=4), reference)


@pytest.mark.parametrize("a,f,edp", [(2, 2, 2), (2, 4, 2)], ids=["A2F2-edp2-ep1", "A2F4-edp2-ep2"])
def test_expert_replicas_match_reference(tmp_path, a, f, edp):
    """Experts replicated inside the expert group (disagmoe.expert_replicas): each attention
    rank dispatches to its replica, the replicas' expert gradients are summed."""
    cache = str(tmp_path / "cache")
    reference = run_single(_config(tmp_path / "ref", "qwen3_moe", "debug", steps=4), cache, steps=4)
    config = with_overrides(_config(tmp_path / "af", "qwen3_moe", "debug", a=a, f=f, p=1, dp=a, microbatches=2,
                                    steps=4), disagmoe={"expert_replicas": edp})
    assert_matches_reference(run_distributed(config, a + f, cache, steps=4), reference)

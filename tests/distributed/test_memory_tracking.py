"""``metrics.memory_tracking_step``: the tracked step's peak memory per pool by category
is logged (even off the log frequency), counts parameters exactly, and moves the way each
feature should: FSDP2 halves the attention pool's parameters and optimizer states over 2
ranks, full activation checkpointing cuts both pools' activations."""

import pytest

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_single_fn, run_train, spawn

pytestmark = pytest.mark.slow


def _config(folder, af_pipe=True, **sections) -> JobConfig:
    config = with_overrides(
        JobConfig(),
        job={"dump_folder": str(folder)},
        training={"steps": 3, "local_batch_size": 4, "seq_len": 128},
        disagmoe={"mode": "af_pipe", "attention_ranks": 2, "expert_ranks": 1, "microbatches": 2} if af_pipe else {},
        metrics={"enable_tensorboard": False, "memory_tracking_step": 2, "log_freq": 10},
    )
    return with_overrides(config, **sections)


def _tracked(logged: list[dict]) -> dict:
    (row,) = [r for r in logged if "tracked_memory_mib" in r]
    assert row["step"] == 2
    return row


def test_single_process_counts_parameters_exactly(tmp_path):
    row = _tracked(run_single_fn(run_train, _config(tmp_path / "out", af_pipe=False), str(tmp_path / "cache"))["logged"])
    assert row["tracked_param_mib"] == pytest.approx(2_299_264 * 4 / 2**20, abs=1e-3)  # debug Qwen3-MoE, fp32
    assert row["tracked_optimizer_mib"] == pytest.approx(2 * row["tracked_param_mib"], abs=1e-2)  # Adam moments
    assert row["tracked_memory_mib"] >= row["tracked_param_mib"] + row["tracked_activation_mib"]


def test_af_pipe_reports_each_pool_and_features_move_it(tmp_path):
    cache = str(tmp_path / "cache")
    runs = {name: _tracked(spawn(3, run_train, _config(tmp_path / name, **sections), cache)["logged"])
            for name, sections in {
                "replicas": {"parallelism": {"data_parallel_shard_degree": 1}},
                "fsdp2": {},
                "ac": {"parallelism": {"data_parallel_shard_degree": 1}, "activation_checkpoint": {"mode": "full"}},
            }.items()}
    none, fsdp2, ac = runs["replicas"], runs["fsdp2"], runs["ac"]
    for pool in ("attention", "expert"):
        for category in ("memory", "param", "grad", "optimizer", "activation", "temp"):
            assert f"tracked_{category}_mib_{pool}" in none
    assert fsdp2["tracked_param_mib_attention"] == pytest.approx(none["tracked_param_mib_attention"] / 2, rel=0.05)
    assert fsdp2["tracked_optimizer_mib_attention"] == pytest.approx(none["tracked_optimizer_mib_attention"] / 2,
                                                                     rel=0.05)
    assert fsdp2["tracked_param_mib_expert"] == none["tracked_param_mib_expert"]
    for pool in ("attention", "expert"):
        assert ac[f"tracked_memory_mib_{pool}"] < 0.8 * none[f"tracked_memory_mib_{pool}"], pool
        assert ac[f"tracked_activation_mib_{pool}"] < 0.6 * none[f"tracked_activation_mib_{pool}"], pool

"""A run interrupted after a checkpoint and resumed gives bitwise the same losses as an
uninterrupted run (CPU, fp32), single process and on 2 ranks with expert parallelism:
model, optimizer, LR schedule, routing bias and data position all come back."""

import json

import pytest

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_train, spawn

pytestmark = pytest.mark.slow
STEPS = 6


def _config(folder, world_size: int, af_pipe: bool = False) -> JobConfig:
    dp = 1 if af_pipe else world_size
    return with_overrides(
        JobConfig(),
        job={"dump_folder": str(folder)},
        training={"steps": STEPS, "local_batch_size": 4 // dp, "seq_len": 32},
        parallelism={"expert_parallel_degree": 1 if af_pipe else world_size},
        disagmoe={"mode": "af_pipe", "attention_ranks": 2, "expert_ranks": 2, "pipeline_depth": 2}
        if af_pipe else {},
        checkpoint={"enable": True, "interval": 3},
        metrics={"enable_tensorboard": False},
    )


def _run(config, world_size, cache, stop_at=None):
    if world_size == 1:
        return run_train(config, cache, stop_at)
    return spawn(world_size, run_train, config, cache, stop_at)


@pytest.mark.parametrize("world_size,af_pipe", [(1, False), (2, False), (4, True)],
                         ids=["single", "ep2", "af_pipe-A2F2p2"])
def test_resume_matches_uninterrupted(tmp_path, world_size, af_pipe):
    cache = str(tmp_path / "cache")
    straight = _run(_config(tmp_path / "straight", world_size, af_pipe), world_size, cache)["logged"]
    resumed_dir = tmp_path / "resumed"
    first = _run(_config(resumed_dir, world_size, af_pipe), world_size, cache, stop_at=4)["logged"]
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    # The checkpoint of step 3 is the newest; step 4 is lost with the "crash".
    second = _run(_config(resumed_dir, world_size, af_pipe), world_size, cache)["logged"]
    assert [m["step"] for m in second] == [4, 5, 6]
    assert [m["loss"] for m in second] == [m["loss"] for m in straight[3:]]
    assert [m["loss"] for m in first] == [m["loss"] for m in straight[:4]]
    # metrics.jsonl keeps the lines of both runs (appended, never truncated).
    lines = (resumed_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4, 5, 6]


def test_checkpoint_moves_from_af_pipe_to_a_single_process(tmp_path):
    """Same FQNs in every layout: a DCP checkpoint written by the disaggregated run (experts as
    DTensor shards on the expert ranks, attention split over two groups) resumes in one process,
    optimizer, LR schedule, routing bias and data position included, and continues the run."""
    import shutil

    cache = str(tmp_path / "cache")
    straight = _run(_config(tmp_path / "af", 4, af_pipe=True), 4, cache)["logged"]
    shutil.copytree(tmp_path / "af" / "checkpoint" / "step-3", tmp_path / "single" / "checkpoint" / "step-3")
    resumed = _run(_config(tmp_path / "single", 1), 1, cache)["logged"]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    for got, want in zip(resumed, straight[3:]):
        assert abs(got["loss"] - want["loss"]) < 1e-5 * want["loss"]

"""Colocated pipeline parallelism (1F1B, Interleaved1F1B, DualPipeV; with EP and FSDP2)
and the intra-layer overlap baseline on gloo ranks equal the single-process reference.

Same seed, same global batch: the loss and every parameter's gradient at step 1 must
match within fp32 tolerance, and so must a 10-step loss curve (Adam steps, aux loss and
the aux-loss-free bias update included). Tolerances as in test_colocated_parity.py. And a
pipelined run's checkpoint resumes in the same layout and in a single process.
"""

import pytest

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_distributed, run_single
from .test_colocated_parity import assert_matches_reference

pytestmark = pytest.mark.slow
GLOBAL_BATCH = 8
STEPS = 10


def _config(tmp_path, world_size: int, name: str, model: str = "qwen3_moe", **parallelism) -> JobConfig:
    dp = world_size // parallelism.get("pipeline_parallel_degree", 1)
    return with_overrides(
        JobConfig(),
        job={"dump_folder": str(tmp_path / name)},
        model={"name": model, "flavor": "debug"},
        training={"steps": STEPS, "local_batch_size": GLOBAL_BATCH // dp, "seq_len": 32},
        parallelism=parallelism,
        moe={"load_balance": "both", "aux_loss_coeff": 1e-2, "bias_update_rate": 1e-2},
        metrics={"enable_tensorboard": False},
        lr_scheduler={"warmup_steps": 1},
    )


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Single-process reference runs, one per model family, computed on first use."""
    cache: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in cache:
            tmp = tmp_path_factory.mktemp(f"ref_{model}")
            cache[model] = run_single(_config(tmp, 1, "ref", model), steps=STEPS,
                                      cache_dir=str(tmp_path_factory.getbasetemp() / "cache"))
        return cache[model]

    return get


PIPELINES = {
    # world 4 = pp 2 x dp 2, experts sharded over the 2 dp ranks of each stage; micro-batch 2
    "ep2-pp2-1f1b": (4, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="1F1B",
                             expert_parallel_degree=2, pipeline_parallel_microbatch_size=2)),
    "ep2-pp2-interleaved": (4, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B",
                                    expert_parallel_degree=2)),
    # world 2 = pp 2 alone (no FSDP, no EP): 8 micro-batches of one sequence
    "pp2-interleaved": (2, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="Interleaved1F1B")),
    "ep2-pp2-dualpipev": (4, dict(pipeline_parallel_degree=2, pipeline_parallel_schedule="DualPipeV",
                                  expert_parallel_degree=2)),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_matches_single_process(tmp_path, tmp_path_factory, references, name):
    world_size, parallelism = PIPELINES[name]
    result = run_distributed(_config(tmp_path, world_size, name, **parallelism), world_size,
                             cache_dir=str(tmp_path_factory.getbasetemp() / "cache"), steps=STEPS)
    assert_matches_reference(result, references("qwen3_moe"))


@pytest.mark.parametrize("model,chunks", [("qwen3_moe", 3), ("deepseek_moe", 2)])
def test_ep_overlap_matches_single_process(tmp_path, tmp_path_factory, references, model, chunks):
    """The overlapping dispatcher, EP 2 on 2 ranks: 256 tokens per rank and layer in 3
    chunks; DeepSeek adds shared experts (overlapped with the combine) and a dense layer."""
    config = _config(tmp_path, 2, f"overlap{chunks}", model, expert_parallel_degree=2,
                     expert_parallel_overlap=True, expert_parallel_overlap_chunks=chunks)
    result = run_distributed(config, 2, cache_dir=str(tmp_path_factory.getbasetemp() / "cache"), steps=STEPS)
    assert_matches_reference(result, references(model))


def test_pipelined_checkpoint_resumes_in_any_layout(tmp_path):
    """Full parameter names on every pipeline rank: the DCP checkpoint of a pipelined run
    (pp 2, Interleaved1F1B: each rank holds layers {0, 2} or {1, 3}) resumes bit for bit in
    the same layout, and in a single process it continues the same loss curve."""
    import shutil

    from .harness import run_train, spawn

    cache = str(tmp_path / "cache")

    def config(folder, pp: int) -> JobConfig:
        parallelism = dict(pipeline_parallel_degree=pp, pipeline_parallel_schedule="Interleaved1F1B") if pp > 1 else {}
        return with_overrides(_config(tmp_path, pp, folder, **parallelism), job={"dump_folder": str(tmp_path / folder)},
                              training={"steps": 6, "local_batch_size": 4}, checkpoint={"enable": True, "interval": 3})

    straight = spawn(2, run_train, config("pp", 2), cache)["logged"]
    for folder in ("pp_resumed", "single"):
        shutil.copytree(tmp_path / "pp" / "checkpoint" / "step-3", tmp_path / folder / "checkpoint" / "step-3")
    resumed = spawn(2, run_train, config("pp_resumed", 2), cache)["logged"]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[3:]]
    single = run_train(config("single", 1), cache)["logged"]
    assert [m["step"] for m in single] == [4, 5, 6]
    for got, want in zip(single, straight[3:]):
        assert abs(got["loss"] - want["loss"]) < 1e-5 * want["loss"]

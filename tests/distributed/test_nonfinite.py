"""Numerical guards: a NaN gradient stops the run naming the step, the parameter and its
pool, before the optimizer step, and the last checkpoint stays the newest; with
``training.skip_nonfinite_steps`` the step's update is skipped and training goes on."""

import math
import pytest

from torchtitan_disagmoe.config.job_config import JobConfig
from torchtitan_disagmoe.config.manager import with_overrides

from .harness import run_single_fn, spawn

pytestmark = pytest.mark.slow
POISONED = "layers.2.moe.experts.w2"
POISON_STEP = 4


def _config(folder, af_pipe: bool, skip: bool) -> JobConfig:
    return with_overrides(
        JobConfig(),
        job={"dump_folder": str(folder)},
        training={"steps": 6, "local_batch_size": 4, "seq_len": 32, "skip_nonfinite_steps": skip},
        disagmoe={"mode": "af_pipe", "attention_ranks": 1, "expert_ranks": 1} if af_pipe else {},
        checkpoint={"enable": True, "interval": 2},
        metrics={"enable_tensorboard": False},
    )


def _poison_and_train(config: JobConfig, cache: str, poison_step: int = POISON_STEP) -> dict:
    """Train; the gradient of one expert weight becomes NaN at ``poison_step`` (on whichever
    rank holds that weight). Returns the logged metrics and the error message, if any."""
    from torchtitan_disagmoe.distributed.failure import TrainingFailure
    from torchtitan_disagmoe.trainer import Trainer

    trainer = Trainer(config, cache_dir=cache)
    params = dict(trainer.model.named_parameters())
    if POISONED in params:
        params[POISONED].register_hook(lambda grad: grad * math.nan if trainer.step == poison_step else grad)
    logged, error = [], None
    try:
        logged = trainer.train(stop_at=poison_step - 1)
        try:
            logged += trainer.train()
        except TrainingFailure as e:
            error = str(e)
    finally:
        trainer.close()
    return {"logged": logged, "error": error, "steps_done": trainer.step}


def _single(config: JobConfig, cache: str, poison_step: int = POISON_STEP) -> dict:
    return run_single_fn(_poison_and_train, config, cache, poison_step)


@pytest.mark.parametrize("af_pipe", [False, True], ids=["single", "af_pipe-A1F1"])
def test_nan_gradient_stops_the_run_and_keeps_the_checkpoint(tmp_path, af_pipe):
    config = _config(tmp_path / "out", af_pipe, skip=False)
    cache = str(tmp_path / "cache")
    result = spawn(2, _poison_and_train, config, cache) if af_pipe else _single(config, cache)
    error = result["error"]
    assert error is not None, result
    assert f"non-finite values at step {POISON_STEP}" in error
    pool = "expert pool" if af_pipe else "single process"
    assert f"{POISONED} ({pool}" in error, error
    assert "last checkpoint is intact" in error
    # Steps 1..3 logged, the checkpoint of step 2 is the newest; nothing was saved at step 4.
    assert [m["step"] for m in result["logged"]] == [1, 2, 3]
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoint").iterdir())
    assert saved == ["step-2"]


def test_skip_nonfinite_steps_skips_the_update_and_continues(tmp_path):
    cache = str(tmp_path / "cache")
    skipped = _single(_config(tmp_path / "skip", False, skip=True), cache)
    assert skipped["error"] is None and skipped["steps_done"] == 6
    logged = skipped["logged"]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(logged[3]["grad_norm"]) and logged[3]["skipped_steps"] == 1
    assert all(math.isfinite(m["loss"]) for m in logged)
    # The skipped step did not advance the LR schedule: step 5 uses step 4's LR of a clean run.
    clean = _single(_config(tmp_path / "clean", False, skip=True), cache, poison_step=-1)
    assert logged[4]["lr"] == clean["logged"][3]["lr"]
